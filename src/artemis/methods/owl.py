"""OWL: outlier-weighted layer-wise sparsity (Yin et al., 2024).

Layers holding more activation *outliers* are more sensitive to pruning, so OWL
prunes them less. The outlier ratio of a unit (a transformer block, or a single layer
outside blocks) is the share of its weights whose Wanda score ``|W_ij| · ‖X_j‖₂``
exceeds ``M`` times the mean score of their layer. The ratios are scaled linearly to a
range of width ``2λ``, and each unit's *density* is ``1 − target + (scaled ratio −
mean)``; the mean is taken **weighted by the units' sizes**, so the pruned-weight
count over all units is exactly ``round_half_up(target · N)`` (the remaining rounding
is spread by largest remainder in :func:`allocate_counts`).

The outlier threshold is taken per layer (``M`` × the mean score of each linear layer);
the OWL reference code, as we know it, takes it over the concatenated scores of the whole
block. On all-MiniLM-L6-v2 the two gave the same result (``benchmarks/owl_minilm.py``).

OWL rests on the premise that the blocks with more outliers are the ones that pruning
hurts most. Where that does not hold it loses to uniform sparsity: on all-MiniLM-L6-v2
(6 blocks) the last block has the fewest outliers but is by far the most sensitive, so
OWL prunes it most and loses at 50%, 60% and 70% for every λ and M tried
(``docs/benchmarks/owl.md``). Measure it against ``scope: row`` on the model at hand.

Example:
    >>> from artemis.methods.owl import owl_sparsities
    >>> s = owl_sparsities([0.01, 0.03, 0.02], [100, 100, 200], target=0.7, lam=0.1)
    >>> [round(v, 4) for v in s]
    [0.8, 0.6, 0.7]
    >>> round(sum(v * n for v, n in zip(s, [100, 100, 200])) / 400, 12)
    0.7
"""

from __future__ import annotations

import math
from typing import Any, Iterable, Optional, Sequence

import torch
import torch.nn as nn
from pydantic import field_validator
from torch import Tensor

from artemis.core.errors import CalibrationError
from artemis.data.calibration import check_calibration_batches, forward_batch, model_device
from artemis.methods.base import MethodOptions
from artemis.methods.sparsegpt import layer_inputs_2d

__all__ = ["OWLOptions", "outlier_ratio", "owl_sparsities", "allocate_counts", "collect_input_norms"]


class OWLOptions(MethodOptions):
    """The OWL keys of the ``pruning:`` section (``magnitude_progressive`` with ``scope: owl``).

    Attributes:
        owl_lambda: OWL's spread λ: the per-block sparsities span a range of width 2λ
            around the target (the outlier ratios are scaled to 2λ), at the final sparsity; a
            progressive run's earlier events at sparsity ``s`` use ``λ·s/final_sparsity``.
            In (0, 0.5]; default 0.08.
        owl_m: OWL's outlier threshold M: a weight is an outlier when its score
            ``|W_ij|·‖X_j‖`` exceeds M times its layer's mean score. Default 5.

    ``scope: owl`` itself is a core key; it counts as a setting of these options (a method
    that does not take them refuses it), and without a ``pattern`` it needs calibration
    batches at every pruning event.

    Example:
        >>> OWLOptions().owl_lambda, OWLOptions(owl_m=3).owl_m
        (0.08, 3.0)
    """

    owl_lambda: float = 0.08
    owl_m: float = 5.0

    @field_validator("owl_lambda")
    @classmethod
    def _check_owl_lambda(cls, v: float) -> float:
        if not (0.0 < v <= 0.5):
            raise ValueError(f"owl_lambda must be in (0, 0.5], got {v!r}")
        return v

    @field_validator("owl_m")
    @classmethod
    def _check_owl_m(cls, v: float) -> float:
        if not (v > 0.0):
            raise ValueError(f"owl_m must be > 0 (outlier = score above owl_m × the layer mean), got {v!r}")
        return v

    def in_use(self, cfg: Any) -> list[str]:
        return (["scope: owl"] if cfg.scope == "owl" else []) + super().in_use(cfg)

    def check(self, cfg: Any) -> None:
        if cfg.scope == "owl" and cfg.layer_sparsity:
            raise ValueError(
                "layer_sparsity does not apply with scope 'owl': OWL chooses every layer's sparsity; remove one of them"
            )

    def calibration_need(self, cfg: Any) -> Optional[str]:
        return "scope: owl" if cfg.scope == "owl" and cfg.pattern is None else None


def outlier_ratio(weight_rows: Tensor, input_norms: Tensor, m: float) -> tuple[int, int]:
    """``(outliers, numel)`` of one layer: weights whose ``|W_ij|·‖X_j‖`` exceeds ``m`` × the
    layer's mean score.

    Args:
        weight_rows: ``(out_features, in_features)``.
        input_norms: ``(in_features,)`` L2 norm of each input feature over the calibration tokens.
        m: the outlier threshold multiple.

    Example:
        >>> import torch
        >>> outlier_ratio(torch.tensor([[1.0, 1.0, 1.0, 9.0]]), torch.ones(4), 2.0)
        (1, 4)
    """
    if weight_rows.dim() != 2 or input_norms.shape != (weight_rows.shape[1],):
        raise ValueError(
            f"outlier_ratio needs weight (out, in) and norms (in,), got {tuple(weight_rows.shape)} and "
            f"{tuple(input_norms.shape)}"
        )
    scores = weight_rows.detach().abs().to(torch.float32) * input_norms.to(weight_rows.device, torch.float32)
    return int((scores > m * scores.mean()).sum()), scores.numel()


def owl_sparsities(ratios: Sequence[float], sizes: Sequence[int], target: float, lam: float) -> list[float]:
    """Per-unit sparsities from outlier ratios; their size-weighted mean is ``target``.

    Args:
        ratios: outlier ratio of each unit.
        sizes: number of prunable weights of each unit.
        target: the overall sparsity.
        lam: OWL's λ; the scaled ratios span ``2λ`` (all equal ratios → all ``target``).

    Raises:
        ValueError: a unit's sparsity falls outside [0, 1) (lower λ).
    """
    if len(ratios) != len(sizes) or not ratios:
        raise ValueError(f"need one size per ratio, got {len(ratios)} ratios and {len(sizes)} sizes")
    lo, hi = min(ratios), max(ratios)
    total = float(sum(sizes))
    if hi - lo <= 0:
        return [float(target)] * len(ratios)
    scaled = [(r - lo) / (hi - lo) * 2 * lam for r in ratios]
    mean = sum(s * n for s, n in zip(scaled, sizes)) / total
    out = [float(target) - (s - mean) for s in scaled]  # more outliers → denser → less sparse
    for i, s in enumerate(out):
        if not (0.0 <= s < 1.0):
            raise ValueError(
                f"OWL gives unit {i} a sparsity of {s:.4f} (target {target}, owl_lambda {lam}); "
                "it must stay in [0, 1): lower owl_lambda"
            )
    return out


def allocate_counts(sparsities: Sequence[float], sizes: Sequence[int], total_prune: int) -> list[int]:
    """Integer pruned counts per unit near ``sparsity · size`` summing exactly to ``total_prune``
    (largest remainder; ties to the earlier unit).

    Example:
        >>> allocate_counts([0.5, 0.5, 0.5], [3, 3, 3], 5)
        [2, 2, 1]
    """
    ideal = [s * n for s, n in zip(sparsities, sizes)]
    counts = [min(int(math.floor(v)), n) for v, n in zip(ideal, sizes)]
    left = total_prune - sum(counts)
    order = sorted(range(len(ideal)), key=lambda i: (-(ideal[i] - math.floor(ideal[i])), i))
    step = 1 if left >= 0 else -1
    while left != 0:
        moved = False
        for i in order if step > 0 else reversed(order):
            if left == 0:
                break
            c = counts[i] + step
            if 0 <= c <= sizes[i]:
                counts[i] = c
                left -= step
                moved = True
        if not moved:
            raise ValueError(f"cannot prune {total_prune} weights out of {sum(sizes)}")
    return counts


@torch.no_grad()
def collect_input_norms(model: nn.Module, targets: Sequence[Any], batches: Iterable) -> dict[str, Tensor]:
    """L2 norm of every input feature of each target over the calibration tokens.

    One forward pass over ``batches`` with a forward pre-hook per target summing ``x²``
    per input feature (padding positions removed when the batch has an
    ``attention_mask``); memory is one float32 vector per target.

    Returns:
        ``{target key: (in_features,) float32 norms}``.

    Raises:
        CalibrationError: bad or empty data, or a target never called.
    """
    data = check_calibration_batches(batches)
    sums: dict[str, Tensor] = {}
    state: dict[str, Optional[Tensor]] = {"token_mask": None}
    handles = []

    def make_hook(key: str):
        def hook(module: nn.Module, args: tuple) -> None:
            x = layer_inputs_2d(args[0], state["token_mask"])  # (tokens, in)
            sq = (x * x).sum(0)
            sums[key] = sq if key not in sums else sums[key] + sq

        return hook

    for t in targets:
        handles.append(t.module.register_forward_pre_hook(make_hook(t.key)))
    device = model_device(model)
    was_training = model.training
    model.eval()
    try:
        for batch in data:
            state["token_mask"] = batch.get("attention_mask") if isinstance(batch, dict) else None
            forward_batch(model, batch, device)
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    missing = [t.name for t in targets if t.key not in sums]
    if missing:
        raise CalibrationError(f"no calibration batch reached layers {missing[:3]}; OWL needs their inputs")
    return {k: v.sqrt() for k, v in sums.items()}
