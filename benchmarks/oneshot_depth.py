"""One-shot pruning time against depth: the block-by-block pipeline (``artemis.oneshot``)
against the old path (``manager.apply_pruning``), for Wanda (``activation``) and SparseGPT.

Random Llama models of one width and two depths (4 and 16 blocks by default); every run
starts from a copy of the same dense weights (the copy is not timed). Runs are interleaved
(round → depth → method → path) so a change of machine load hits every cell alike; the
figure is the median over rounds, and the ratio is median(16 blocks) / median(4 blocks).
A linear cost gives 4.0; the goal is at most 4.6.

Run from the repository root::

    PYTHONPATH=src python benchmarks/oneshot_depth.py [--rounds 5] [--old-rounds 1] [--threads 2] [--quick]

Wall and CPU time (``time.process_time``) are both recorded: on a machine shared with
other jobs the CPU time of this process is the steadier of the two.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import llama_config, machine  # noqa: E402
from artemis import create_pruning_manager, oneshot  # noqa: E402

METHODS = {
    "wanda": {"final_sparsity": 0.5, "importance_metric": "activation"},
    "sparsegpt": {"final_sparsity": 0.5, "importance_metric": "activation", "reconstruction": "sparsegpt"},
}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--depths", default="4,16")
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--intermediate", type=int, default=688)
    ap.add_argument("--batches", type=int, default=4)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--old-rounds", type=int, default=1, help="rounds of the old path (0: skip it); it is slow")
    ap.add_argument("--quick", action="store_true", help="1 round, small model (a smoke run)")
    ap.add_argument(
        "--json", default=str(Path(__file__).resolve().parent / "results" / "oneshot_depth.json"), help="raw output"
    )
    args = ap.parse_args()
    if args.quick:
        args.rounds, args.hidden, args.intermediate, args.seq = 1, 64, 128, 32
    torch.set_num_threads(args.threads)
    depths = [int(d) for d in args.depths.split(",")]
    vocab = 1000
    models = {}
    for d in depths:
        torch.manual_seed(0)
        from transformers import LlamaForCausalLM

        cfg = llama_config(
            hidden=args.hidden, layers=d, intermediate=args.intermediate, vocab=vocab, heads=4, kv_heads=4
        )
        models[d] = LlamaForCausalLM(cfg).eval()
    g = torch.Generator().manual_seed(1)
    calib = [
        {"input_ids": torch.randint(0, vocab, (args.batch_size, args.seq), generator=g)} for _ in range(args.batches)
    ]
    paths = ["pipeline", "old"] if args.old_rounds > 0 else ["pipeline"]
    times: dict[str, list[float]] = {}
    cpu: dict[str, list[float]] = {}
    forwards: dict[str, int] = {}
    for r in range(args.rounds):
        for d in depths:
            for name, pcfg in METHODS.items():
                for path in paths:
                    if path == "old" and r >= args.old_rounds:
                        continue
                    net = copy.deepcopy(models[d])
                    c0 = time.process_time()
                    t0 = time.perf_counter()
                    if path == "pipeline":
                        s = oneshot(net, {"pruning": pcfg}, calib, progress=False)
                        forwards[f"{name}/{d}"] = s["pipeline"]["block_forwards"]
                    else:
                        mgr = create_pruning_manager({"pruning": pcfg}, net)
                        mgr.apply_pruning(pcfg["final_sparsity"], calibration_data=calib, progress=False)
                    secs = time.perf_counter() - t0
                    cpus = time.process_time() - c0
                    times.setdefault(f"{name}/{path}/{d}", []).append(secs)
                    cpu.setdefault(f"{name}/{path}/{d}", []).append(cpus)
                    print(f"round {r} depth {d:2d} {name:9s} {path:8s} {secs:7.2f}s wall {cpus:7.2f}s cpu", flush=True)
    rows = []
    lo, hi = min(depths), max(depths)
    for name in METHODS:
        for path in paths:
            med = {d: statistics.median(times[f"{name}/{path}/{d}"]) for d in depths}
            cmed = {d: statistics.median(cpu[f"{name}/{path}/{d}"]) for d in depths}
            rows.append(
                {
                    "method": name,
                    "path": path,
                    "rounds": len(times[f"{name}/{path}/{lo}"]),
                    "median_seconds": {str(d): round(med[d], 3) for d in depths},
                    "ratio": round(med[hi] / med[lo], 2),
                    "median_cpu_seconds": {str(d): round(cmed[d], 3) for d in depths},
                    "cpu_ratio": round(cmed[hi] / cmed[lo], 2),
                    "all_seconds": {str(d): [round(t, 3) for t in times[f"{name}/{path}/{d}"]] for d in depths},
                    "all_cpu_seconds": {str(d): [round(t, 3) for t in cpu[f"{name}/{path}/{d}"]] for d in depths},
                }
            )
            print(
                f"{name:9s} {path:8s} "
                + " ".join(f"{d}: {med[d]:.2f}s" for d in depths)
                + f"  ratio {med[hi] / med[lo]:.2f} (cpu {cmed[hi] / cmed[lo]:.2f})"
            )
    out = {
        "machine": machine(),
        "load_average_end": list(os.getloadavg()),
        "args": vars(args),
        "depths": depths,
        "block_forwards": forwards,
        "rows": rows,
        "goal": f"pipeline ratio {hi}/{lo} blocks <= 4.6 for wanda and sparsegpt",
    }
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(out, indent=1) + "\n", encoding="utf-8")
    print("wrote", args.json)


if __name__ == "__main__":
    main()
