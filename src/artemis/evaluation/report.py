"""Run reports: ``report.json``, ``report.md`` and plots (matplotlib).

``report.json`` holds at least:

* ``sparsity`` — measured fraction of exact zeros over the pruned layers;
* ``quality`` — ``{"metric", "dense", "pruned"}`` (``embedding_cosine_vs_dense`` for
  encoders, with ``nn_agreement`` and ``cosine_min``; ``perplexity`` for causal LMs);
* ``size_mb`` — ``{"dense", "compressed"}`` from the shared size accounting, plus
  ``on_disk`` (bytes the saved folder's weight files really take) when saved;
* ``latency_ms`` — ``{"dense", "pruned"}`` forward latency in ms on the run's device, both
  models warm and timed in interleaved rounds (the median over the rounds of each round's
  fastest forward), with ``rounds``
  (each round's figure), ``spread`` (``(max - min) / min`` over the rounds: the noise),
  ``method`` (rounds, repeats, warm-up, statistic, thread count) and ``device``;
* ``parameters``, ``config`` (the config that ran), ``history`` (per-step loss,
  sparsity, quality), ``layers`` (per-layer sparsity), ``timing`` and ``memory``.

Plots (PNG, skipped with a logged warning when matplotlib is missing):
``sparsity_vs_step.png``, ``quality_vs_step.png`` (when quality was measured during
training), ``layer_sparsity.png``, and for sweeps ``sweep.png``.

Example:
    >>> from artemis.evaluation.report import format_markdown
    >>> md = format_markdown({"sparsity": 0.6, "quality": {"metric": "perplexity", "dense": 10.0, "pruned": 12.5},
    ...                       "size_mb": {"dense": 4.0, "compressed": 2.0}, "latency_ms": {"dense": 1.0, "pruned": 1.0}})
    >>> "| perplexity | 10.0000 | 12.5000 |" in md
    True
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

__all__ = ["write_report", "format_markdown", "plot_run", "plot_sweep", "write_json", "latency_note"]

logger = logging.getLogger(__name__)


def _write_text_atomic(path: os.PathLike, text: str) -> None:
    """Write ``text`` to ``PATH.tmp``, then rename it to ``path``; the temporary file is
    removed if the write fails or is interrupted (Ctrl-C), so no orphan is left behind."""
    p = Path(path)
    tmp = p.with_name(p.name + ".tmp")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, p)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_json(path: os.PathLike, data: Any) -> None:
    """Write ``data`` as indented JSON (atomically)."""
    _write_text_atomic(path, json.dumps(data, indent=2, sort_keys=False, default=str) + "\n")


def latency_note(lat: Mapping[str, Any]) -> str:
    """One sentence saying how the latencies were measured and how noisy they were.

    Example:
        >>> print(latency_note({"dense": 2.0, "pruned": 1.9, "spread": {"dense": 0.031, "pruned": 0.02},
        ...     "method": {"rounds": 5, "repeats": 20, "warmup": 3, "interleaved": True, "threads": 2}}))
        ... # doctest: +NORMALIZE_WHITESPACE
        Latency: 5 interleaved rounds (dense, pruned, dense, ...) of 20 timed forwards each after 3 warm-up
        forwards, 2 threads; the figure is the median over rounds of each round's fastest forward;
        round-to-round spread: dense 3.1%, pruned 2.0%.
    """
    m = lat.get("method")
    if not m:
        return ""
    how = "interleaved rounds (dense, pruned, dense, ...)" if m.get("interleaved") else "rounds"
    text = (
        f"Latency: {m['rounds']} {how} of {m['repeats']} timed forwards each after {m['warmup']} warm-up "
        f"forwards, {m['threads']} thread{'s' if m['threads'] != 1 else ''}; the figure is the "
        + m.get("statistic", "median over rounds of each round's fastest forward")
    )
    spread = lat.get("spread") or {}
    if spread:
        text += "; round-to-round spread: " + ", ".join(f"{k} {v:.1%}" for k, v in spread.items())
    return text + "."


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4f}"
    return "—" if v is None else str(v)


def format_markdown(report: Mapping[str, Any]) -> str:
    """The human-readable ``report.md`` text of a report dict."""
    q = report.get("quality", {})
    size = report.get("size_mb", {})
    lat = report.get("latency_ms", {})
    lines = ["# Artemis pruning report", ""]
    if "model" in report:
        lines += [f"Model: `{report['model']}` ({report.get('task', '?')})", ""]
    lines += [
        f"Measured sparsity of the pruned layers: **{report.get('sparsity', 0.0):.2%}**",
        "",
        "| measure | dense | pruned |",
        "|---|---|---|",
        f"| {q.get('metric', 'quality')} | {_fmt(q.get('dense'))} | {_fmt(q.get('pruned'))} |",
    ]
    for extra in ("nn_agreement", "cosine_min"):
        if extra in q:
            lines.append(f"| {extra} | {_fmt(q.get(extra + '_dense', 1.0))} | {_fmt(q[extra])} |")
    lines += [
        f"| size (MiB) | {_fmt(size.get('dense'))} | {_fmt(size.get('compressed'))} (compressed) |",
        f"| latency (ms, forward{', ' + str(lat['device']) if lat.get('device') else ''}) "
        f"| {_fmt(lat.get('dense'))} | {_fmt(lat.get('pruned'))} |",
    ]
    if "on_disk" in size:
        lines.append(f"| saved on disk (MiB) | — | {_fmt(size['on_disk'])} |")
    note = latency_note(lat)
    if note:
        lines += ["", note]
    dist_info = report.get("distributed")
    if dist_info:
        lines += ["", f"Processes: {dist_info.get('world_size')} ({dist_info.get('mode')}); ranks identical."]
    params = report.get("parameters")
    if params:
        lines += ["", f"Parameters: {params.get('parameters')} ({params.get('nonzero_parameters')} non-zero)"]
    timing = report.get("timing")
    if timing:
        lines += ["", "Timing (s): " + ", ".join(f"{k} {v:.1f}" for k, v in timing.items())]
    mem = report.get("memory")
    if mem:
        lines += ["", "Peak memory (MiB): " + ", ".join(f"{k} {v:.0f}" for k, v in mem.items())]
    layers = report.get("layers")
    if layers and "status" in layers[0]:  # layer dropout: one row per block
        lines += ["", "## Blocks", "", "| block | parameters | status | score |", "|---|---|---|---|"]
        lines += [
            f"| {row['name']} | {row['numel']} | {row['status']} | "
            f"{'' if row.get('score') is None else format(row['score'], '.6g')} |"
            for row in layers
        ]
    elif layers:
        lines += ["", "## Per-layer sparsity", "", "| layer | shape | sparsity |", "|---|---|---|"]
        lines += [
            f"| {layer['name']} | {'×'.join(map(str, layer['shape']))} | {layer['sparsity']:.2%} |" for layer in layers
        ]
    plots = report.get("plots")
    if plots:
        lines += ["", "## Plots", ""] + [f"![{p}]({p})" for p in plots]
    if "config" in report:
        import yaml

        lines += [
            "",
            "## Config that ran",
            "",
            "```yaml",
            yaml.safe_dump(report["config"], sort_keys=False).rstrip(),
            "```",
        ]
    return "\n".join(lines) + "\n"


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        logger.warning("matplotlib is not installed: no plots (pip install 'artemis-prune[plots]')")
        return None
    return plt


def plot_run(
    out_dir: os.PathLike,
    history: Sequence[Mapping[str, Any]],
    layers: Sequence[Mapping[str, Any]],
    quality_metric: str = "quality",
) -> list[str]:
    """Write the run's plots into ``out_dir``; return the file names written."""
    plt = _pyplot()
    if plt is None:
        return []
    out = Path(out_dir)
    written = []
    if history:
        fig, ax = plt.subplots(figsize=(6, 3.5))
        steps = [h["step"] for h in history]
        ax.plot(steps, [h["sparsity"] for h in history], label="measured")
        ax.plot(steps, [h["target_sparsity"] for h in history], "--", label="target (schedule)")
        ax.set_xlabel("step"), ax.set_ylabel("sparsity"), ax.legend(), ax.grid(alpha=0.3)
        fig.tight_layout(), fig.savefig(out / "sparsity_vs_step.png", dpi=100), plt.close(fig)
        written.append("sparsity_vs_step.png")
        q = [(h["step"], h["quality"]) for h in history if "quality" in h]
        if q:
            fig, ax = plt.subplots(figsize=(6, 3.5))
            ax.plot(*zip(*q), marker="o")
            ax.set_xlabel("step"), ax.set_ylabel(quality_metric), ax.grid(alpha=0.3)
            fig.tight_layout(), fig.savefig(out / "quality_vs_step.png", dpi=100), plt.close(fig)
            written.append("quality_vs_step.png")
    if layers:
        fig, ax = plt.subplots(figsize=(7, max(3.0, 0.18 * len(layers))))
        ax.barh([layer["name"] for layer in layers], [layer["sparsity"] for layer in layers])
        ax.invert_yaxis(), ax.set_xlabel("sparsity"), ax.tick_params(axis="y", labelsize=6), ax.set_xlim(0, 1)
        fig.tight_layout(), fig.savefig(out / "layer_sparsity.png", dpi=100), plt.close(fig)
        written.append("layer_sparsity.png")
    return written


def plot_sweep(
    out_dir: os.PathLike, rows: Sequence[Mapping[str, Any]], quality_metric: str, threshold: Optional[float] = None
) -> list[str]:
    """Quality and compressed size vs sparsity (``sweep.png``); return the files written."""
    plt = _pyplot()
    if plt is None:
        return []
    s = [r["sparsity"] for r in rows]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(s, [r["quality"] for r in rows], marker="o", color="C0")
    ax.set_xlabel("sparsity"), ax.set_ylabel(quality_metric, color="C0"), ax.grid(alpha=0.3)
    if threshold is not None:
        ax.axhline(threshold, color="C0", ls=":")
    ax2 = ax.twinx()
    ax2.plot(s, [r["size_mb"] for r in rows], marker="s", color="C1")
    ax2.set_ylabel("compressed size (MiB)", color="C1")
    fig.tight_layout(), fig.savefig(Path(out_dir) / "sweep.png", dpi=100), plt.close(fig)
    return ["sweep.png"]


def write_report(out_dir: os.PathLike, report: dict, *, plots: bool = True) -> dict:
    """Write ``report.json``, ``report.md`` and the plots into ``out_dir``; return the report."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if plots:
        report["plots"] = plot_run(
            out, report.get("history", []), report.get("layers", []), report.get("quality", {}).get("metric", "quality")
        )
    write_json(out / "report.json", report)
    _write_text_atomic(out / "report.md", format_markdown(report))
    return report
