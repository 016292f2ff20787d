"""CPU decode latency of a ~110M-parameter Llama: dense vs Artemis's sparse inference path.

A Llama (hidden 768, 12 layers, MLP 2048, vocabulary 32000, tied embeddings; random
weights — latency does not depend on the values) is pruned to 60% and 70% unstructured
sparsity by magnitude (each weight matrix on its own). For each decode batch size
(1, 8, 64 sequences, one new token per call, with a KV cache) we time, in the same
process:

* dense: the pruned model as is (zeros multiplied);
* auto: after ``sparsify_for_inference(model, batch_size=b)`` — each linear layer uses
  the fastest sparse kernel (``bitmask`` where the CPU has AVX-512, ``csr``) only where it
  measured faster than dense at that batch size (dense fallback);
* forced: every pruned linear layer on its fastest sparse kernel (``min_speedup=0``), to
  show where sparse loses.

``--backend csr`` restricts both to PyTorch's CSR kernel (the path used before the compiled kernels).

Run from the repository root::

    PYTHONPATH=src python benchmarks/sparse_cpu_latency.py [--threads 1] [--tokens 16] [--clock cpu|wall]

``--clock cpu`` (the default) times the main thread's CPU time, which with one torch
thread is the work done and does not count time spent waiting for a core on a shared
machine; use ``--clock wall`` on a quiet machine.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
import warnings
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

from artemis import create_pruning_manager
from artemis.sparse.inference import CLOCKS, sparsify_for_inference


def build(seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=32000,
        hidden_size=768,
        intermediate_size=2048,
        num_hidden_layers=12,
        num_attention_heads=12,
        num_key_value_heads=12,
        max_position_embeddings=512,
        tie_word_embeddings=True,
    )
    return LlamaForCausalLM(cfg).eval()


@torch.no_grad()
def decode_ms(models: list, batch: int, tokens: int, clock: str, prefix: int = 16) -> list[float]:
    """Median milliseconds per decode step (one new token for each of ``batch`` sequences)
    of each model; the models take turns at every step, so load changes hit all alike."""
    from transformers import DynamicCache

    now = CLOCKS[clock]
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, models[0].config.vocab_size, (batch, prefix), generator=g)
    times: list[list[float]] = [[] for _ in models]
    for rep in range(2):  # the first round warms up
        caches = [DynamicCache() for _ in models]
        nxt = []
        for m, c in zip(models, caches):
            out = m(input_ids=ids, past_key_values=c, use_cache=True)
            nxt.append(out.logits[:, -1:].argmax(-1))
        for _ in range(tokens):
            for i, (m, c) in enumerate(zip(models, caches)):
                t0 = now()
                out = m(input_ids=nxt[i], past_key_values=c, use_cache=True)
                if rep:
                    times[i].append(now() - t0)
                nxt[i] = out.logits[:, -1:].argmax(-1)
    return [1e3 * sorted(t)[len(t) // 2] for t in times]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--tokens", type=int, default=16, help="timed decode steps per measurement")
    ap.add_argument("--batches", default="1,8,64")
    ap.add_argument("--sparsities", default="0.6,0.7")
    ap.add_argument(
        "--json",
        default=None,
        help="raw output (default: benchmarks/results/sparse_cpu_latency[_avx2]_<n>thread(s).json)",
    )
    ap.add_argument("--backend", default="auto", choices=["auto", "bitmask", "csr"])
    ap.add_argument(
        "--clock",
        default="cpu",
        choices=sorted(CLOCKS),
        help="cpu: the main thread's CPU time (robust on a shared machine, with 1 thread); wall: elapsed",
    )
    args = ap.parse_args()
    if args.json is None:
        kind = "_avx2" if os.environ.get("ARTEMIS_KERNELS") == "avx2" else ""
        plural = "thread" if args.threads == 1 else "threads"
        args.json = str(
            Path(__file__).resolve().parent / "results" / f"sparse_cpu_latency{kind}_{args.threads}{plural}.json"
        )
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", category=FutureWarning)  # transformers: past_key_values renamed
    base = build()
    n_params = sum(p.numel() for p in base.parameters())
    from artemis.sparse.kernels import kernel_status

    print(
        f"Llama {n_params / 1e6:.1f}M parameters, torch {torch.__version__}, {args.threads} thread(s), "
        f"MKL {torch.backends.mkl.is_available()}, clock {args.clock}, backend {args.backend}, "
        f"kernels: {kernel_status()['reason']}",
        flush=True,
    )
    rows = []
    for s in [float(v) for v in args.sparsities.split(",")]:
        pruned = copy.deepcopy(base)
        mgr = create_pruning_manager({"pruning": {"final_sparsity": s, "scope": "layer"}}, pruned)
        mgr.apply_magnitude_pruning(s)
        mgr.finalize()
        for b in [int(v) for v in args.batches.split(",")]:
            auto_model = copy.deepcopy(pruned)
            t0 = time.perf_counter()
            report = sparsify_for_inference(
                auto_model, batch_size=b, min_sparsity=0.5, repeats=15, clock=args.clock, backend=args.backend
            )
            pick_s = time.perf_counter() - t0
            forced_model = copy.deepcopy(pruned)
            sparsify_for_inference(
                forced_model, batch_size=b, min_sparsity=0.5, min_speedup=0.0, repeats=3, backend=args.backend
            )
            dense, auto, forced = decode_ms([pruned, auto_model, forced_model], b, args.tokens, args.clock)
            del auto_model, forced_model
            measured = [e for e in report.values() if "speedup" in e]
            n_sparse = sum(e["choice"] == "sparse" for e in measured)
            kinds = sorted({e["backend"] for e in measured if e["choice"] == "sparse"})
            by_kind = ", ".join(
                f"{sum(e['choice'] == 'sparse' and e['backend'] == k for e in measured)} {k}" for k in kinds
            )
            layer_dense = sum(e["dense_us"] for e in measured)
            layer_best = sum(
                min(e["dense_us"], e["sparse_us"]) if e["choice"] == "sparse" else e["dense_us"] for e in measured
            )
            row = {
                "sparsity": s,
                "batch": b,
                "dense_ms": round(dense, 2),
                "auto_ms": round(auto, 2),
                "forced_sparse_ms": round(forced, 2),
                "auto_speedup": round(dense / auto, 3),
                "forced_speedup": round(dense / forced, 3),
                "layers_sparse": f"{n_sparse}/{len(measured)}" + (f" ({by_kind})" if by_kind else ""),
                "pruned_linear_speedup": round(layer_dense / layer_best, 3) if layer_best else None,
                "selection_seconds": round(pick_s, 1),
            }
            rows.append(row)
            print(json.dumps(row), flush=True)
    print()
    print(
        "| sparsity | batch | dense ms/token | auto ms/token | speed-up (auto) | all-sparse ms/token | speed-up (all sparse) | layers on a sparse kernel | pruned linears speed-up |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['sparsity']:.0%} | {r['batch']} | {r['dense_ms']} | {r['auto_ms']} | {r['auto_speedup']}× | "
            f"{r['forced_sparse_ms']} | {r['forced_speedup']}× | {r['layers_sparse']} | {r['pruned_linear_speedup']}× |"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    sys.exit(main())
