"""Benchmark of the embedded default run (`artemis prune` with no config).

Runs the command line exactly as a user would (a subprocess), measures wall-clock time
and the peak resident memory of that process, and reads quality from its report.json.
For comparison it also runs one-shot pruning at the same sparsity (`--steps 0`, no
training), side by side, so the table shows what the training + distillation buys.

Usage (from the repository root):

    PYTHONPATH=src python benchmarks/cli_default.py                # the full default
    PYTHONPATH=src python benchmarks/cli_default.py --steps 40 --batch-size 16   # a shorter run

Extra arguments are passed to `artemis prune` unchanged. The runs use
``OMP_NUM_THREADS`` from the environment (default 2); on a machine shared with other
jobs, ``OMP_NUM_THREADS=1`` is much faster (two OpenMP threads spin-wait for each other
when the scheduler gives them less than two cores; see docs/benchmarks/cli_default.md).
Results are printed as a
Markdown table and written to benchmarks/results/cli_default.json.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run(args: list[str], out: Path) -> dict:
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
    r0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)
    if proc.returncode != 0:
        raise SystemExit(f"artemis prune {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr[-2000:]}")
    report = json.loads((out / "report.json").read_text())
    return {
        "command": "artemis prune " + " ".join(args),
        "wall_s": wall,
        # CPU seconds used: on a shared machine wall time is inflated by other jobs;
        # cpu_s / 2 is the wall time a dedicated 2-core machine would need at best
        "cpu_s": cpu,
        "peak_rss_mib": report["memory"]["peak_rss"],  # the artemis process's own peak (getrusage)
        "sparsity": report["sparsity"],
        "quality": report["quality"],
        "size_mb": report["size_mb"],
        "latency_ms": report["latency_ms"],
        "timing": report["timing"],
        "runtime": report["runtime"],
    }


def main() -> None:
    extra = sys.argv[1:]
    if extra in (["-h"], ["--help"]):
        print(__doc__)
        return
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        results["one_shot"] = run(["--steps", "0"], Path(tmp) / "oneshot")
        results["default"] = run(extra, Path(tmp) / "default")
    (ROOT / "benchmarks" / "results").mkdir(exist_ok=True)
    (ROOT / "benchmarks" / "results" / "cli_default.json").write_text(json.dumps(results, indent=2))
    print("| run | wall s | CPU s | peak RSS MiB | sparsity | cosine vs dense | NN agreement | compressed MiB |")
    print("|---|---|---|---|---|---|---|---|")
    for r in results.values():
        q = r["quality"]
        print(
            f"| {r['command']} | {r['wall_s']:.0f} | {r['cpu_s']:.0f} | {r['peak_rss_mib']:.0f} | {r['sparsity']:.2%} | "
            f"{q['pruned']:.4f} | {q.get('nn_agreement', float('nan')):.4f} | {r['size_mb']['compressed']:.1f} |"
        )
    print("(full numbers: benchmarks/results/cli_default.json)")


if __name__ == "__main__":
    main()
