"""Quality recovered by the default run's training + distillation, by sparsity.

For each point — unstructured 50 %, 60 %, 70 %, 80 % and semi-structured 2:4 (which fixes
50 %) — runs `artemis prune` as a subprocess twice: one-shot (`--steps 0`: the default's
metric, pruned at once, no training) and with the default recovery (the embedded
default run: progressive pruning during distillation from the dense model, the same
training loop), and reads the mean cosine of pruned vs dense sentence embeddings on the
held-out sentences from each report.json. The table puts the two side by side.

Usage (from the repository root):

    PYTHONPATH=src python benchmarks/recovery.py                      # full default recovery
    PYTHONPATH=src python benchmarks/recovery.py --name recovery_short -- --steps 150 --batch-size 16

Options: ``--sparsities`` (comma-separated, default ``0.5,0.6,0.7,0.8``), ``--no-nm``
(skip the 2:4 row; it runs the default written to a YAML file with ``pattern: "2:4"`` and
no ``scope``), ``--seed`` (``training.seed``, default 0), ``--name`` (raw output
``benchmarks/results/<name>.json``, default ``recovery``). Arguments after ``--`` go to
every recovery run (a shorter recovery setting for the whole table, for example); the
one-shot runs get only the sparsity. ``OMP_NUM_THREADS`` as in ``cli_default.py``.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, machine, write_json  # noqa: E402
from cli_default import run  # noqa: E402


def nm_config(folder: Path) -> str:
    """Write the embedded default with ``pattern: "2:4"`` (no ``scope``: N:M chooses within
    each group of 4 weights; the pattern fixes 50 %) to a YAML file; return its path."""
    import copy

    import yaml

    from artemis.train.run_config import EMBEDDED_DEFAULT

    cfg = copy.deepcopy(EMBEDDED_DEFAULT)
    cfg["pruning"].pop("scope", None)
    cfg["pruning"].update(pattern="2:4", final_sparsity=0.5)
    path = folder / "default_2of4.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return str(path)


def _short(r: dict) -> dict:
    q = r["quality"]
    return {
        "command": r["command"],
        "sparsity": r["sparsity"],
        "cosine": q["pruned"],
        "cosine_min": q.get("cosine_min"),
        "nn_agreement": q.get("nn_agreement"),
        "wall_s": r["wall_s"],
        "user_cpu_s": r["user_cpu_s"],
        "load_average_before": r["load_average_before"],
        "quality_during_training": r.get("quality_during_training", []),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sparsities", default="0.5,0.6,0.7,0.8")
    ap.add_argument("--no-nm", action="store_true", help="skip the 2:4 row")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--name", default="recovery", help="raw output: benchmarks/results/NAME.json")
    ap.add_argument("extra", nargs="*", help="after --: arguments passed to every recovery run")
    a = ap.parse_args()
    points = [(f"unstructured {float(s):.0%}", ["--final-sparsity", s]) for s in a.sparsities.split(",") if s]
    results: dict = {
        "command": "python benchmarks/recovery.py " + " ".join(sys.argv[1:]),
        "machine": machine(),
        "recovery_args": a.extra,
        "seed": a.seed,
        "rows": [],
    }
    print(
        "| pruning | sparsity | one-shot cosine | after recovery | NN agreement one-shot → recovered | recovery wall s |"
    )
    print("|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        if not a.no_nm:  # a config file: --set pruning.pattern on the default trips over its row scope
            points.append(("2:4 (50%)", [nm_config(Path(tmp))]))
        for i, (label, args) in enumerate(points):
            one = run(args + ["--steps", "0"], Path(tmp) / f"oneshot{i}")
            rec = run(args + list(a.extra) + ["--seed", str(a.seed)], Path(tmp) / f"recovery{i}")
            row = {"pruning": label, "one_shot": _short(one), "recovered": _short(rec)}
            results["rows"].append(row)
            o, r = row["one_shot"], row["recovered"]
            print(
                f"| {label} | {r['sparsity']:.2%} | {o['cosine']:.4f} | {r['cosine']:.4f} | "
                f"{o['nn_agreement']:.3f} → {r['nn_agreement']:.3f} | {r['wall_s']:.0f} |",
                flush=True,
            )
            write_json(RESULTS / f"{a.name}.json", results)  # after every row: a stopped run keeps its rows


if __name__ == "__main__":
    main()
