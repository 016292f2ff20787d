"""Global magnitude pruning: Artemis vs torch.nn.utils.prune.global_unstructured.

Prunes the same randomly initialised ~95M-parameter Llama (the Linear layers of its
blocks, about 71M weights) to 60% by global L1 magnitude, with
``PruningManager.apply_magnitude_pruning(0.6)`` and with
``prune.global_unstructured(..., L1Unstructured, amount=0.6)`` followed by
``prune.remove``. Each runs in a fresh subprocess so that its peak extra memory (peak
RSS during pruning minus RSS before) is its own. Prints a markdown table with ratios.

    python benchmarks/global_threshold.py [--layers 10] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(__file__))


def worker(kind: str, layers: int, threads: int) -> dict:
    import torch

    torch.set_num_threads(threads)
    from _common import llama_config, peak_rss_mib, random_llama

    model = random_llama(llama_config(layers=layers))
    linears = [(n, m) for n, m in model.model.layers.named_modules() if isinstance(m, torch.nn.Linear)]
    prunable = sum(m.weight.numel() for _, m in linears)
    before = peak_rss_mib()
    t0 = time.perf_counter()
    if kind == "artemis":
        from artemis import create_pruning_manager

        mgr = create_pruning_manager({"pruning": {"final_sparsity": 0.6}}, model)
        t1 = time.perf_counter()
        mgr.apply_magnitude_pruning(0.6)
        setup = t1 - t0
    else:
        import torch.nn.utils.prune as prune

        params = [(m, "weight") for _, m in linears]
        t1 = time.perf_counter()
        prune.global_unstructured(params, pruning_method=prune.L1Unstructured, amount=0.6)
        for m, name in params:
            prune.remove(m, name)
        setup = 0.0
    elapsed = time.perf_counter() - t1
    peak = peak_rss_mib()
    zeros = sum(int((m.weight == 0).sum()) for _, m in linears)
    return {
        "kind": kind,
        "seconds": elapsed,
        "setup_seconds": setup,
        "extra_mib": peak - before,
        "prunable": prunable,
        "prunable_mib": prunable * 4 / 2**20,
        "sparsity": zeros / prunable,
        "params": sum(p.numel() for p in model.parameters()),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=10)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--worker", choices=["artemis", "torch"])
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.layers, args.threads)))
        return
    from _common import machine

    results = {}
    for kind in ("torch", "artemis"):
        out = (
            subprocess.run(
                [
                    sys.executable,
                    __file__,
                    "--worker",
                    kind,
                    "--layers",
                    str(args.layers),
                    "--threads",
                    str(args.threads),
                ],
                check=True,
                capture_output=True,
                text=True,
            )
            .stdout.strip()
            .splitlines()[-1]
        )
        results[kind] = json.loads(out)
    a, t = results["artemis"], results["torch"]
    print(f"machine: {machine()}")
    print(
        f"model: Llama, {a['params'] / 1e6:.1f}M parameters, {a['prunable'] / 1e6:.1f}M prunable (fp32, {a['prunable_mib']:.0f} MiB)"
    )
    print()
    print("| | wall time (s) | peak extra memory (MiB) | extra / prunable bytes | sparsity |")
    print("|---|---|---|---|---|")
    for name, r in (("torch.nn.utils.prune.global_unstructured + remove", t), ("Artemis apply_magnitude_pruning", a)):
        print(
            f"| {name} | {r['seconds']:.2f} | {r['extra_mib']:.0f} | {r['extra_mib'] / r['prunable_mib']:.2f}x | {r['sparsity']:.4f} |"
        )
    print(
        f"| **ratio torch / Artemis** | **{t['seconds'] / a['seconds']:.1f}x faster** | **{t['extra_mib'] / max(a['extra_mib'], 1e-9):.1f}x less** | | |"
    )
    print(f"\n(Artemis manager creation, not included above: {a['setup_seconds']:.2f} s)")


if __name__ == "__main__":
    main()
