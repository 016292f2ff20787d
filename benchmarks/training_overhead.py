"""Overhead of the pruning manager on a small training run.

Trains the same small randomly initialised Llama (AdamW, batch 8 × 128 tokens) for
``--steps`` steps without and with a ``magnitude_progressive`` manager
(``pruning_interval=50``, the specification's loop: ``step()``, ``apply_mask_to_gradients()``,
then ``optimizer.step()``), alternating A/B/A/B runs in one process, and reports
steps/s of each and the overhead ratio.

    python benchmarks/training_overhead.py [--steps 200] [--repeats 2]
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))

from _common import RESULTS, llama_config, machine, random_llama, write_json  # noqa: E402


def run(with_manager: bool, steps: int, batch: dict, packed: bool = False) -> tuple[float, float]:
    model = random_llama(llama_config(hidden=256, layers=4, intermediate=768, vocab=8000, heads=8, kv_heads=8))
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.01)
    mgr = None
    if with_manager:
        from artemis import create_pruning_manager

        mgr = create_pruning_manager(
            {"pruning": {"final_sparsity": 0.6, "pruning_interval": 50, "packed_masks": packed}},
            model,
            total_steps=steps,
        )
    t0 = time.perf_counter()
    for _ in range(steps):
        loss = model(**batch).loss
        loss.backward()
        if mgr is not None:
            mgr.step()
            mgr.apply_mask_to_gradients()
        opt.step()
        opt.zero_grad()
    elapsed = time.perf_counter() - t0
    sparsity = mgr.get_pruning_summary()["measured_sparsity"] if mgr else 0.0
    return steps / elapsed, sparsity


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--packed-masks", action="store_true", help="also time packed_masks: true")
    ap.add_argument("--json", default=None, help="raw output (default: benchmarks/results/training_overhead_<n>t.json)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 8000, (8, 128), generator=g)
    batch = {"input_ids": ids, "labels": ids}
    base, pruned, packed = [], [], []
    for _ in range(args.repeats):
        base.append(run(False, args.steps, batch)[0])
        sps, sparsity = run(True, args.steps, batch)
        pruned.append(sps)
        if args.packed_masks:
            packed.append(run(True, args.steps, batch, packed=True)[0])
    b, p = max(base), max(pruned)
    from statistics import median

    res = {
        "machine": machine(),
        "command": " ".join(sys.argv),
        "steps": args.steps,
        "repeats": args.repeats,
        "threads": args.threads,
        "steps_per_s": {"dense": base, "manager": pruned, "manager_packed": packed},
        "final_sparsity": sparsity,
        "overhead_best": b / p - 1,
        "overhead_median": median(base) / median(pruned) - 1,
        "overhead_packed_best": (b / max(packed) - 1) if packed else None,
        "overhead_packed_median": (median(base) / median(packed) - 1) if packed else None,
    }
    print(f"machine: {res['machine']}")
    print(f"{args.steps} steps, batch 8x128, best of {args.repeats} alternating runs")
    print("| run | steps/s | final sparsity |")
    print("|---|---|---|")
    print(f"| dense training, no manager | {b:.2f} | 0 |")
    print(f"| with PruningManager (interval 50) | {p:.2f} | {sparsity:.4f} |")
    print(f"| **overhead** | **{(b / p - 1) * 100:.1f}%** | |")
    if packed:
        q = max(packed)
        print(f"| with PruningManager, `packed_masks: true` | {q:.2f} | |")
        print(f"| **overhead, packed masks** | **{(b / q - 1) * 100:.1f}%** | |")
    print(f"(median of the runs: overhead {res['overhead_median'] * 100:.1f}%", end="")
    if packed:
        print(f", packed {res['overhead_packed_median'] * 100:.1f}%", end="")
    print(")")
    write_json(args.json or RESULTS / f"training_overhead_{args.threads}t.json", res)


if __name__ == "__main__":
    main()
