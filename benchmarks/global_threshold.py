"""Global magnitude pruning: Artemis vs torch.nn.utils.prune.global_unstructured.

Prunes the same randomly initialised ~95M-parameter Llama (the Linear layers of its
blocks, about 71M weights) to 60% by global L1 magnitude, with
``PruningManager.apply_magnitude_pruning(0.6)`` and with
``prune.global_unstructured(..., L1Unstructured, amount=0.6)`` followed by
``prune.remove``.

* Time: both sides in one process, taking turns (A B, then B A, ...) for ``--rounds``
  rounds, each on a fresh copy of the same model; median and min of each side.
* Memory: each side once in a fresh subprocess, so that its peak extra memory (peak RSS
  during pruning minus RSS before) is its own.

Prints a markdown table with ratios and writes the raw figures to
benchmarks/results/global_threshold.json.

    python benchmarks/global_threshold.py [--layers 10] [--threads 2] [--rounds 5]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(__file__))

from _common import RESULTS  # noqa: E402


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


def _timing(layers: int, threads: int, rounds: int) -> dict:
    """Both sides in this one process, taking turns (A B, B A, A B, ...), each on a fresh
    copy of the same model; returns the wall times and the CPU times (all threads of the
    process, less disturbed by other jobs than wall time) of every round."""
    import torch

    torch.set_num_threads(threads)
    from _common import llama_config, random_llama

    times: dict[str, list[float]] = {"torch": [], "artemis": []}
    cpu: dict[str, list[float]] = {"torch": [], "artemis": []}
    for r in range(rounds):
        for kind in ("torch", "artemis") if r % 2 == 0 else ("artemis", "torch"):
            model = random_llama(llama_config(layers=layers))
            linears = [m for m in model.model.layers.modules() if isinstance(m, torch.nn.Linear)]
            if kind == "artemis":
                from artemis import create_pruning_manager

                mgr = create_pruning_manager({"pruning": {"final_sparsity": 0.6}}, model)
                t0, c0 = time.perf_counter(), time.process_time()
                mgr.apply_magnitude_pruning(0.6)
                times[kind].append(time.perf_counter() - t0)
                cpu[kind].append(time.process_time() - c0)
                del mgr
            else:
                import torch.nn.utils.prune as prune

                params = [(m, "weight") for m in linears]
                t0, c0 = time.perf_counter(), time.process_time()
                prune.global_unstructured(params, pruning_method=prune.L1Unstructured, amount=0.6)
                for m, name in params:
                    prune.remove(m, name)
                times[kind].append(time.perf_counter() - t0)
                cpu[kind].append(time.process_time() - c0)
            del model, linears
    return times, cpu


def _memory(kind: str, layers: int, threads: int) -> dict:
    out = subprocess.run(
        [sys.executable, __file__, "--worker", kind, "--layers", str(layers), "--threads", str(threads)],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    return json.loads(out.splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=10)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=5, help="interleaved timing rounds (each side once per round)")
    ap.add_argument("--json", default=str(RESULTS / "global_threshold.json"), help="raw output (default: %(default)s)")
    ap.add_argument("--worker", choices=["artemis", "torch"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.layers, args.threads)))
        return
    from statistics import median

    from _common import machine, write_json

    load_before = os.getloadavg()
    # memory: each side alone in a fresh process (peak RSS is per process)
    mem = {kind: _memory(kind, args.layers, args.threads) for kind in ("torch", "artemis")}
    # time: both sides in one process, alternating, several rounds
    times, cpu = _timing(args.layers, args.threads, args.rounds)
    load_after = os.getloadavg()
    a, t = mem["artemis"], mem["torch"]
    ta, tt = times["artemis"], times["torch"]
    res = {
        "machine": machine(),
        "load_average_before": load_before,
        "load_average_after": load_after,
        "layers": args.layers,
        "threads": args.threads,
        "rounds": args.rounds,
        "params": a["params"],
        "prunable": a["prunable"],
        "prunable_mib": a["prunable_mib"],
        "seconds": times,
        "median_s": {"torch": median(tt), "artemis": median(ta)},
        "min_s": {"torch": min(tt), "artemis": min(ta)},
        "speedup_median": median(tt) / median(ta),
        "speedup_min": min(tt) / min(ta),
        "speedup_per_round": [x / y for x, y in zip(tt, ta)],
        "cpu_seconds": cpu,
        "cpu_median_s": {"torch": median(cpu["torch"]), "artemis": median(cpu["artemis"])},
        "cpu_speedup_median": median(cpu["torch"]) / median(cpu["artemis"]),
        "cpu_speedup_min": min(cpu["torch"]) / min(cpu["artemis"]),
        "memory_runs": mem,
        "extra_mib": {"torch": t["extra_mib"], "artemis": a["extra_mib"]},
        "memory_ratio": t["extra_mib"] / max(a["extra_mib"], 1e-9),
        "artemis_setup_seconds": a["setup_seconds"],
        "sparsity": {"torch": t["sparsity"], "artemis": a["sparsity"]},
    }
    print(f"machine: {res['machine']}")
    print(
        f"model: Llama, {a['params'] / 1e6:.1f}M parameters, {a['prunable'] / 1e6:.1f}M prunable "
        f"(fp32, {a['prunable_mib']:.0f} MiB); {args.rounds} interleaved rounds"
    )
    print()
    print("| | median s | min s | peak extra memory (MiB) | extra / prunable bytes | sparsity |")
    print("|---|---|---|---|---|---|")
    for name, kind, r in (
        ("torch.nn.utils.prune.global_unstructured + remove", "torch", t),
        ("Artemis apply_magnitude_pruning", "artemis", a),
    ):
        print(
            f"| {name} | {res['median_s'][kind]:.2f} | {res['min_s'][kind]:.2f} | {r['extra_mib']:.0f} "
            f"| {r['extra_mib'] / r['prunable_mib']:.2f}x | {r['sparsity']:.4f} |"
        )
    print(
        f"| **ratio torch / Artemis** | **{res['speedup_median']:.1f}x** | **{res['speedup_min']:.1f}x** "
        f"| **{res['memory_ratio']:.1f}x less** | | |"
    )
    print(
        f"CPU time (all threads), median: torch {res['cpu_median_s']['torch']:.2f} s, "
        f"Artemis {res['cpu_median_s']['artemis']:.2f} s: {res['cpu_speedup_median']:.1f}x "
        f"(min: {res['cpu_speedup_min']:.1f}x); load average {load_before[0]:.1f} before, {load_after[0]:.1f} after"
    )
    print(f"\n(Artemis manager creation, not included above: {a['setup_seconds']:.2f} s)")
    write_json(args.json, res)


if __name__ == "__main__":
    main()
