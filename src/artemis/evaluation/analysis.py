"""Sparsity sweeps: try several sparsity levels without committing to a training run.

:func:`sparsity_sweep` prunes the model one-shot to each level (with the configured
method, metric and scope), calls your ``evaluate_fn(model)``, and restores the dense
weights **bit for bit** from an in-memory copy (no reload from disk). Statistics that
the metric needs are gathered once, on the dense model, from ``calibration_data``
and reused for every level (they do not depend on the level). :func:`best_sparsity`
picks the highest level whose metric stays above a threshold.

Memory: one CPU copy of the prunable weights (at their own dtype) for the duration of
the sweep, plus the metric's statistics (``activation``: one float per input feature
per layer; ``gradient_sensitivity``: one accumulator value per prunable weight).

Example:
    >>> import torch, torch.nn as nn
    >>> from artemis.evaluation.analysis import sparsity_sweep, best_sparsity
    >>> torch.manual_seed(0) and None
    >>> net = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))
    >>> x = torch.randn(32, 16); y = net(x).detach()
    >>> @torch.no_grad()
    ... def evaluate(model):
    ...     return {"cosine": float(nn.functional.cosine_similarity(model(x), y).mean())}
    >>> table = sparsity_sweep(net, {"pruning": {"targets": ["*"]}}, [0.25, 0.5, 0.9], evaluate)
    >>> [(row["sparsity"], round(row["metrics"]["cosine"], 2)) for row in table]
    [(0.25, 0.99), (0.5, 0.89), (0.9, 0.76)]
    >>> torch.equal(net(x), y)  # the dense weights are back
    True
    >>> best_sparsity(table, "cosine", 0.85)
    0.5
"""

from __future__ import annotations

import logging
import math
import numbers
import os
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence, Union

import torch
import torch.nn as nn
from torch import Tensor

from artemis.core.config import PruningConfig, load_pruning_config
from artemis.core.errors import ConfigError

__all__ = ["sparsity_sweep", "best_sparsity", "format_sweep_table"]

logger = logging.getLogger(__name__)

EvaluateFn = Callable[[nn.Module], Any]


def _metrics_of(value: Any, sparsity: float) -> dict[str, Any]:
    if isinstance(value, Mapping):
        return dict(value)
    if isinstance(value, numbers.Number) and not isinstance(value, bool):
        return {"metric": value}
    if isinstance(value, Tensor) and value.numel() == 1:
        return {"metric": float(value)}
    raise TypeError(
        f"evaluate_fn must return a dict of metrics or a number, got {type(value).__name__} at sparsity {sparsity}"
    )


def _check_sparsities(sparsities: Sequence[float]) -> list[float]:
    if isinstance(sparsities, (str, bytes)) or not isinstance(sparsities, Iterable):
        raise ConfigError(f"sparsities must be a list of numbers in [0, 1), got {sparsities!r}")
    out = []
    for s in sparsities:
        if isinstance(s, bool) or not isinstance(s, numbers.Real) or not (0.0 <= float(s) < 1.0):
            raise ConfigError(f"sparsities: each must be a number in [0, 1), got {s!r}")
        out.append(float(s))
    if not out:
        raise ConfigError("sparsities is empty; give at least one level, e.g. [0.3, 0.5, 0.7]")
    return out


def sparsity_sweep(
    model: nn.Module,
    config: Union[PruningConfig, Mapping, str, os.PathLike],
    sparsities: Sequence[float],
    evaluate_fn: EvaluateFn,
    calibration_data: Optional[Iterable] = None,
    *,
    loss_fn: Optional[Callable[[Any, Any], Tensor]] = None,
    progress: Optional[bool] = None,
) -> list[dict[str, Any]]:
    """Prune ``model`` to each of ``sparsities``, evaluate it, and restore it exactly.

    Args:
        model: the dense model (left bit-for-bit unchanged on return, also on error).
        config: a pruning config (any form :func:`~artemis.core.config.load_pruning_config`
            accepts); its method, importance metric, scope, targets and
            ``layer_sparsity`` are used; the schedule keys are ignored.
        sparsities: the levels to try, each in [0, 1), in the order given.
        evaluate_fn: ``evaluate_fn(model)`` returning a dict of metrics or one number
            (then recorded as ``{"metric": value}``).
        calibration_data: batches for metrics that need statistics (see
            :mod:`artemis.data.calibration`); read once, on the dense model. With
            ``reconstruction: sparsegpt`` or ``scope: owl`` they are also kept (as a list)
            and given to every level's pruning event.
        loss_fn: loss for ``gradient_sensitivity`` calibration (see ``calibrate``).
        progress: progress bar while calibrating.

    Returns:
        One row per level: ``{"sparsity", "measured_sparsity", "metrics",
        "model_size_mb", "model_size_reduction"}`` where the size is the compressed
        size from the same accounting as ``get_pruning_summary()`` (the row at 0.0 is
        the bitmask layout's size, slightly above the dense size).

    Raises:
        ConfigError: bad sparsities or config; CalibrationError: the metric needs
        statistics and ``calibration_data`` is missing or malformed.
    """
    from artemis.core.manager import PruningManager

    if not callable(evaluate_fn):
        raise TypeError(f"evaluate_fn must be callable as evaluate_fn(model), got {type(evaluate_fn).__name__}")
    levels = _check_sparsities(sparsities)
    cfg = load_pruning_config(config)
    if not cfg.enabled:
        cfg = cfg.model_copy(update={"enabled": True})

    first = PruningManager(model, cfg)
    params = first.method.masked_params()
    dense = {k: p.detach().to("cpu", copy=True) for k, p in params.items()}

    def restore() -> None:
        with torch.no_grad():
            for k, p in params.items():
                p.copy_(dense[k])

    stats: Optional[dict] = None
    rows: list[dict[str, Any]] = []
    # kept as a list only when every level needs the batches again (SparseGPT / OWL)
    batches = list(calibration_data) if calibration_data is not None and first.needs_calibration_data else None
    data = batches if batches is not None else calibration_data
    try:
        if data is not None and (first.metric.needs_activations or first.metric.needs_gradients or batches is None):
            first.calibrate(data, loss_fn=loss_fn, progress=progress)
            stats = first.metric.state_dict()
        first.close()
        for s in levels:
            mgr = PruningManager(model, cfg)
            try:
                if stats is not None:
                    mgr.metric.load_state_dict(stats)
                if batches is not None and mgr.needs_calibration_data:  # SparseGPT / OWL at each level
                    mgr.set_calibration_data(batches)
                mgr.apply_pruning(s)
                pm = dict(mgr.pruning_metrics)
                metrics = _metrics_of(evaluate_fn(model), s)
            finally:
                mgr.close()
                restore()
            rows.append(
                {
                    "sparsity": s,
                    "measured_sparsity": pm["current_sparsity"],
                    "metrics": metrics,
                    "model_size_mb": pm["compressed_model_size_mb"],
                    "model_size_reduction": pm["model_size_reduction"],
                }
            )
            logger.info("sparsity %.3f: %s, %.2f MiB", s, metrics, pm["compressed_model_size_mb"])
    finally:
        first.close()
        restore()
        dense.clear()
        stats = None
    return rows


def best_sparsity(
    rows: Sequence[Mapping[str, Any]],
    metric: str,
    threshold: float,
    *,
    higher_is_better: bool = True,
) -> Optional[float]:
    """The highest sparsity whose ``metric`` stays at or above ``threshold`` (at or below
    it when ``higher_is_better=False``, e.g. for perplexity); ``None`` when no level does.

    Raises:
        KeyError: a row has no metric named ``metric`` (the message lists the names).
    """
    best: Optional[float] = None
    for row in rows:
        values = row["metrics"]
        if metric not in values:
            raise KeyError(f"sweep row at sparsity {row['sparsity']} has no metric {metric!r}; has {sorted(values)}")
        v = float(values[metric])
        if math.isnan(v):
            continue
        ok = v >= threshold if higher_is_better else v <= threshold
        if ok and (best is None or row["sparsity"] > best):
            best = row["sparsity"]
    return best


def format_sweep_table(rows: Sequence[Mapping[str, Any]], digits: int = 4) -> str:
    """A Markdown table of a sweep (one column per metric).

    Example:
        >>> print(format_sweep_table([{"sparsity": 0.5, "measured_sparsity": 0.5, "metrics": {"acc": 0.91},
        ...                            "model_size_mb": 1.5, "model_size_reduction": 0.25}]))
        | sparsity | measured | size (MiB) | reduction | acc |
        |---|---|---|---|---|
        | 0.50 | 0.5000 | 1.50 | 25.0% | 0.9100 |
    """
    names: list[str] = []
    for r in rows:
        for k in r["metrics"]:
            if k not in names:
                names.append(k)
    head = "| sparsity | measured | size (MiB) | reduction | " + " | ".join(names) + " |"
    sep = "|" + "---|" * (4 + len(names))
    lines = [head, sep]
    for r in rows:
        vals = []
        for k in names:
            v = r["metrics"].get(k, "")
            vals.append(f"{v:.{digits}f}" if isinstance(v, float) else str(v))
        lines.append(
            f"| {r['sparsity']:.2f} | {r['measured_sparsity']:.4f} | {r['model_size_mb']:.2f} | "
            f"{r['model_size_reduction']:.1%} | " + " | ".join(vals) + " |"
        )
    return "\n".join(lines)
