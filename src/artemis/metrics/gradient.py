"""``gradient_sensitivity``: weight magnitude times the mean absolute gradient.

Score of weight ``w`` at a pruning event::

    score(w) = |w| · (1/n) · Σ_{t=1..n} |g_t(w)|

where ``g_t`` is the gradient of ``w`` seen at the ``t``-th ``PruningManager.step()``
since the previous pruning event (or at the ``t``-th calibration batch), ``n`` the
number of those steps in which the weight's layer had a gradient, and ``w`` the weight
at the event (the value that pruning removes).

Why this form: ``|w·g|`` is the first-order Taylor estimate of the change in loss when
``w`` is set to zero. A single step's gradient is noisy, so it is averaged over the
steps since the last event. The *absolute* gradients are averaged, not the gradients:
with a signed sum, a weight whose gradient swings from +a to -a between steps would
look unimportant although the loss depends on it strongly. Dividing by ``n`` (per
layer) keeps layers comparable under ``scope: global`` even if some layer received
gradients in fewer steps; when every layer sees every step it ranks exactly like
``|w| · Σ|g|``. The current ``|w|`` is used (not ``Σ|w_t g_t|``) because pruning removes
the current value, and it avoids a multiply per weight per step.

Memory: one accumulator value per prunable weight, in ``accumulator_dtype``
(``metric_options: {accumulator_dtype: float32}``, the default: 4 bytes per weight;
``bfloat16`` or ``float16``: 2 bytes). ``bfloat16`` keeps float32's range but only
about 3 significant digits, so small gradients added to a large sum are rounded away
over long intervals; ``float16`` keeps more digits but flushes gradients below about
6e-8 to zero. The accumulators are allocated at the first gradient after a pruning
event and freed at the event, and the manager stops calling ``on_step()`` after the
last event of the schedule, so they cost nothing outside the pruning window.

Example:
    >>> import torch
    >>> gradient_sensitivity_scores(torch.tensor([[2.0, -1.0]]), torch.tensor([[0.5, 3.0]]), 2).tolist()
    [[0.5, 1.5]]
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict
from torch import Tensor

from artemis.core.distributed import local_tensor
from artemis.core.errors import CalibrationError
from artemis.core.targets import PrunableTarget
from artemis.metrics.base import METRICS, ImportanceMetric

__all__ = [
    "GradientSensitivityMetric",
    "GradientSensitivityOptions",
    "gradient_sensitivity_scores",
    "ACCUMULATOR_DTYPES",
]

ACCUMULATOR_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def gradient_sensitivity_scores(weight: Tensor, grad_abs_sum: Tensor, steps: int) -> Tensor:
    """``|w| · grad_abs_sum / steps`` in float32, shaped like ``weight``.

    Args:
        weight: the weight.
        grad_abs_sum: ``Σ|g|`` over ``steps`` steps, shaped like ``weight`` (any float dtype).
        steps: number of steps summed (>= 1).
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if grad_abs_sum.shape != weight.shape:
        raise ValueError(f"gradient sum shape {tuple(grad_abs_sum.shape)} differs from weight {tuple(weight.shape)}")
    w = weight.detach().abs().to(torch.float32)
    return w * (grad_abs_sum.to(device=w.device, dtype=torch.float32) / steps)


class GradientSensitivityOptions(BaseModel):
    """``metric_options`` of ``gradient_sensitivity``.

    Attributes:
        accumulator_dtype: dtype of the per-weight ``Σ|g|`` accumulator: ``float32``
            (default, 4 B/weight), ``bfloat16`` or ``float16`` (2 B/weight).
    """

    model_config = ConfigDict(extra="forbid")
    accumulator_dtype: Literal["float32", "bfloat16", "float16"] = "float32"


@METRICS.register("gradient_sensitivity")
class GradientSensitivityMetric(ImportanceMetric):
    """``|w| · mean_t |g_t|`` (see the module docstring for the formula and its memory).

    Needs ``PruningManager.step()`` to be called after ``loss.backward()`` (the specification's
    loop does), or calibration data with a loss (``manager.calibrate(data, loss_fn=...)``).
    """

    name = "gradient_sensitivity"
    default_scope = "global"
    needs_gradients = True
    options_model = GradientSensitivityOptions

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self.dtype = ACCUMULATOR_DTYPES[self.options["accumulator_dtype"]]
        self._acc: dict[str, Tensor] = {}
        self._steps: dict[str, int] = {}

    @torch.no_grad()
    def on_step(self) -> None:
        for t in self.targets:
            g = t.param.grad
            if g is None:
                continue
            g = local_tensor(g)  # FSDP2: the local shard of the reduce-scattered gradient
            acc = self._acc.get(t.key)
            if acc is None:
                acc = torch.zeros(g.shape, dtype=self.dtype, device=g.device)
                self._acc[t.key] = acc
            acc.add_(g.detach().abs().to(self.dtype))
            self._steps[t.key] = self._steps.get(t.key, 0) + 1

    @property
    def steps_seen(self) -> int:
        """Most steps with a gradient seen by any layer since the last reset."""
        return max(self._steps.values(), default=0)

    def accumulator_bytes(self) -> int:
        """Bytes held by the accumulators right now."""
        return sum(a.numel() * a.element_size() for a in self._acc.values())

    def check_ready(self) -> None:
        if not self._steps:
            raise CalibrationError(
                "importance_metric 'gradient_sensitivity' has seen no gradients since the last pruning "
                "event: during training call manager.step() after loss.backward() (before "
                "optimizer.zero_grad()); for one-shot pruning pass calibration_data whose batches give a "
                "loss (for example dicts with 'labels') or a loss_fn(outputs, batch) to "
                "manager.calibrate()/apply_pruning(); make sure the pruned weights have requires_grad"
            )
        missing = [t.key for t in self.targets if t.key not in self._steps]
        if missing:
            raise CalibrationError(
                f"importance_metric 'gradient_sensitivity': {len(missing)} of {len(self.targets)} pruned weights "
                f"never received a gradient (for example {missing[:3]}); they are not used by the loss or do "
                "not require grad. Exclude them with pruning.exclude or use a loss that depends on them"
            )
        if not any(bool(a.any()) for a in self._acc.values()):
            raise CalibrationError(
                "importance_metric 'gradient_sensitivity': every accumulated gradient is exactly zero, so the "
                "scores carry no information. A loss at its minimum (for example a distillation loss of the "
                "model to its own outputs) has zero gradient; use a task loss or another metric"
            )

    def score(self, target: PrunableTarget) -> Tensor:
        acc = self._acc.get(target.key)
        if acc is None:
            self.check_ready()
            raise CalibrationError(f"no gradient statistics for {target.key}")
        return gradient_sensitivity_scores(local_tensor(target.param), acc, self._steps[target.key])

    def reset(self) -> None:
        self._acc = {}
        self._steps = {}

    def detach(self) -> None:
        self.reset()

    def state_dict(self) -> dict:
        """The accumulators (references, like ``nn.Module.state_dict``) and step counts."""
        return {
            "accumulator_dtype": self.options["accumulator_dtype"],
            "acc": {k: a.detach() for k, a in self._acc.items()},
            "steps": dict(self._steps),
        }

    def load_state_dict(self, state: dict) -> None:
        if not state:
            return
        known = {t.key: t for t in self.targets}
        acc = state.get("acc", {})
        steps = state.get("steps", {})
        bad = sorted(set(acc) - set(known)) or sorted(set(steps) ^ set(acc))
        if bad:
            raise CalibrationError(f"gradient_sensitivity state does not match this model's targets: {bad[:3]}")
        new_acc: dict[str, Tensor] = {}
        for k, a in acc.items():
            p = local_tensor(known[k].param)
            if tuple(a.shape) != tuple(p.shape):
                raise CalibrationError(
                    f"gradient_sensitivity state for {k} has shape {tuple(a.shape)}, the weight has {tuple(p.shape)}"
                )
            new_acc[k] = a.to(device=p.device, dtype=self.dtype)
        self._acc = new_acc
        self._steps = {k: int(v) for k, v in steps.items()}
