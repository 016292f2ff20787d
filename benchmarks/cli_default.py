"""Benchmark of the embedded default run (`artemis prune` with no config).

Runs the command line exactly as a user would (a subprocess, once per seed), measures the
wall-clock time, the user and system CPU seconds and the load average around each run,
and reads quality (mean cosine of pruned vs dense sentence embeddings on the held-out
sentences, its minimum, nearest-neighbour agreement) from the run's report.json. For
comparison it also runs one-shot pruning at the same sparsity (`--steps 0`, no
training), so the table shows what the training + distillation buys.

Usage (from the repository root):

    PYTHONPATH=src python benchmarks/cli_default.py                          # the default, seed 0
    PYTHONPATH=src python benchmarks/cli_default.py --seeds 0,1,2            # three seeds
    PYTHONPATH=src python benchmarks/cli_default.py --seeds 0,1,2 --sparsity 0.7
    PYTHONPATH=src python benchmarks/cli_default.py --name cli_default_old -- --steps 300 --set pruning.pruning_end=0.5

Options: ``--seeds`` (comma-separated ``training.seed`` values, default ``0``),
``--sparsity`` (``--final-sparsity`` of the runs; default: the default's 60 %),
``--no-one-shot`` (skip the one-shot baseline), ``--name`` (raw output file
``benchmarks/results/<name>.json``, default ``cli_default``). Arguments after ``--`` are
passed to `artemis prune` unchanged. The runs use ``OMP_NUM_THREADS`` from the
environment (default 2); on a machine shared with other jobs, ``OMP_NUM_THREADS=1`` is
much faster (two OpenMP threads spin-wait for each other when the scheduler gives them
less than two cores; see docs/benchmarks/cli_default.md). Results are printed as a
Markdown table and written to the raw JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, machine, write_json  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def run(args: list[str], out: Path) -> dict:
    """Run ``artemis prune ARGS -o OUT -q --no-plots`` in a subprocess; return its figures."""
    env = dict(
        os.environ,
        HF_HUB_OFFLINE="1",
        PYTHONPATH=str(ROOT / "src"),
        OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "2"),
    )
    cmd = [
        sys.executable,
        "-c",
        "import sys; from artemis.cli import main; sys.exit(main())",
        "prune",
        *args,
        "-o",
        str(out),
        "-q",
        "--no-plots",
    ]
    load_before = os.getloadavg()
    r0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    load_after = os.getloadavg()
    if proc.returncode != 0:
        raise SystemExit(f"artemis prune {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr[-2000:]}")
    report = json.loads((out / "report.json").read_text())
    history = report.get("history") or []
    return {
        "command": "artemis prune " + " ".join(args),
        "omp_num_threads": env["OMP_NUM_THREADS"],
        "wall_s": wall,
        # CPU seconds used: on a shared machine wall time is inflated by other jobs;
        # cpu_s / 2 is the wall time a dedicated 2-core machine would need at best
        "user_cpu_s": r1.ru_utime - r0.ru_utime,
        "sys_cpu_s": r1.ru_stime - r0.ru_stime,
        "cpu_s": (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime),
        "load_average_before": list(load_before),
        "load_average_after": list(load_after),
        "peak_rss_mib": report["memory"]["peak_rss"],  # the artemis process's own peak (getrusage)
        "sparsity": report["sparsity"],
        "quality": report["quality"],
        "size_mb": report["size_mb"],
        "latency_ms": report["latency_ms"],
        "timing": report["timing"],
        "runtime": report["runtime"],
        "quality_during_training": [
            {"step": h["step"], "sparsity": h.get("sparsity"), "quality": h["quality"]}
            for h in history
            if "quality" in h
        ],
    }


def _row(label: str, r: dict) -> str:
    q = r["quality"]
    return (
        f"| {label} | {r['wall_s']:.0f} | {r['user_cpu_s']:.0f} | {r['load_average_before'][0]:.1f} | "
        f"{r['peak_rss_mib']:.0f} | {r['sparsity']:.2%} | {q['pruned']:.4f} | {q.get('nn_agreement', float('nan')):.4f} |"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", default="0", help="comma-separated training seeds (default 0)")
    ap.add_argument("--sparsity", type=float, default=None, help="final sparsity (default: the default's)")
    ap.add_argument("--no-one-shot", action="store_true", help="skip the one-shot baseline")
    ap.add_argument("--name", default="cli_default", help="raw output: benchmarks/results/NAME.json")
    ap.add_argument("extra", nargs="*", help="after --: arguments passed to artemis prune")
    a = ap.parse_args()
    seeds = [int(s) for s in a.seeds.split(",") if s.strip()]
    base = list(a.extra)
    if a.sparsity is not None:
        base += ["--final-sparsity", str(a.sparsity)]
    results: dict = {
        "command": "python benchmarks/cli_default.py " + " ".join(sys.argv[1:]),
        "machine": machine(),
        "runs": {},
    }
    print("| run | wall s | user CPU s | load | peak RSS MiB | sparsity | cosine vs dense | NN agreement |")
    print("|---|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        if not a.no_one_shot:
            r = results["runs"]["one_shot"] = run(base + ["--steps", "0"], Path(tmp) / "oneshot")
            print(_row(r["command"], r), flush=True)
        for seed in seeds:
            r = results["runs"][f"seed{seed}"] = run(base + ["--seed", str(seed)], Path(tmp) / f"seed{seed}")
            print(_row(r["command"], r), flush=True)
    cos = [results["runs"][f"seed{s}"]["quality"]["pruned"] for s in seeds]
    results["summary"] = {
        "seeds": seeds,
        "cosine": cos,
        "mean_cosine": statistics.fmean(cos),
        "min_cosine": min(cos),
        "mean_wall_s": statistics.fmean(results["runs"][f"seed{s}"]["wall_s"] for s in seeds),
        "mean_user_cpu_s": statistics.fmean(results["runs"][f"seed{s}"]["user_cpu_s"] for s in seeds),
    }
    s = results["summary"]
    print(f"\nmean cosine over seeds {seeds}: {s['mean_cosine']:.4f} (lowest {s['min_cosine']:.4f})")
    write_json(RESULTS / f"{a.name}.json", results)


if __name__ == "__main__":
    main()
