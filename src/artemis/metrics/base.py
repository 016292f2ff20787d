"""The importance-metric contract and its registry.

A metric turns a prunable weight (and whatever statistics it gathered) into a score
tensor **shaped like the weight, float32, non-negative; higher means more important**.
It is a small stateful class because some metrics gather statistics over steps or
calibration batches; the scoring itself should be a pure function of tensors (see
:func:`artemis.metrics.magnitude.magnitude_scores`).

Lifecycle, driven by the manager:

1. ``attach(model, targets)`` — once; install any forward hooks the metric needs.
2. ``on_step()`` — at every ``PruningManager.step()`` (after ``backward()``) while a
   pruning event is still to come; must be O(1) for metrics that need nothing per step.
   One-shot calibration of a metric with ``needs_gradients`` calls it once per batch,
   after that batch's ``backward()``.
3. ``check_ready()`` then ``score(target)`` for each target — at a pruning event.
   Before ``check_ready()``, when several processes train together
   (``torch.distributed`` initialised, world size > 1), the manager calls
   ``all_reduce_(group)`` on every rank: a metric that gathers statistics from its
   own rank's data (activation norms, token counts) sums them over the ranks there
   (:func:`artemis.core.distributed.all_reduce_sum_`), so every rank scores the data of
   all ranks. Statistics built from gradients after DDP/FSDP synchronised them are
   identical on every rank already and must not be summed again (leave the default).
   Under FSDP2, ``target.param`` is a ``DTensor``: ``score`` may return a ``DTensor``
   (the manager scores its local shard) or the local shard's scores directly.
4. ``reset()`` — after each pruning event (statistics start afresh; free what you can).
5. ``detach()`` — once, at ``finalize()``/``close()``; remove every hook.

During calibration (:mod:`artemis.data.calibration`) the runner wraps each batch in
``with metric.calibrating(batch):`` — a metric may use it to see the batch (the
``activation`` metric reads ``attention_mask`` to skip padding tokens).

Options: a metric that takes options (the config's ``metric_options``) declares them
as a pydantic model in ``options_model``; they are validated when the config is
loaded and arrive, validated, as ``self.options``.

Writing your own::

    from artemis.metrics import METRICS, ImportanceMetric

    @METRICS.register("squared")
    class Squared(ImportanceMetric):
        def score(self, target):
            return target.param.detach().float() ** 2

and use ``importance_metric: squared`` in the config. The registry itself,
:data:`artemis.core.registry.METRICS`, is re-exported here and by :mod:`artemis.metrics`.
"""

from __future__ import annotations

import contextlib
from typing import Any, ClassVar, Iterator, Mapping, Optional, Sequence

import torch.nn as nn
from pydantic import BaseModel, ValidationError
from torch import Tensor

from artemis.core.registry import METRICS
from artemis.core.targets import PrunableTarget

__all__ = ["ImportanceMetric", "METRICS"]


class ImportanceMetric:
    """Base class of importance metrics (see the module docstring for the lifecycle).

    Class attributes:
        name: the registered name.
        default_scope: ``global``/``layer``/``row``; used when the config's ``scope`` is unset.
        needs_gradients: ``step()`` must be called after ``backward()`` for it to work.
        needs_activations: it gathers statistics from forward passes (training or
            ``manager.calibrate``).
        options_model: pydantic model of the options the metric takes (``None``: none).
    """

    name: ClassVar[str] = "base"
    default_scope: ClassVar[str] = "global"
    needs_gradients: ClassVar[bool] = False
    needs_activations: ClassVar[bool] = False
    options_model: ClassVar[Optional[type[BaseModel]]] = None

    def __init__(self, **options: Any) -> None:
        self.options = self.validate_options(options)
        self.model: Optional[nn.Module] = None
        self.targets: Sequence[PrunableTarget] = ()

    @classmethod
    def validate_options(cls, options: Mapping[str, Any]) -> dict[str, Any]:
        """Check ``options`` against ``options_model``; return them with defaults filled in.

        Raises:
            ValueError: an unknown option or a bad value (the message names both).

        Example:
            >>> from artemis.metrics import METRICS
            >>> METRICS.get("magnitude").validate_options({"x": 1})
            Traceback (most recent call last):
            ...
            ValueError: importance_metric 'magnitude' takes no metric_options, got {'x': 1}
        """
        options = dict(options)
        if cls.options_model is None:
            if options:
                raise ValueError(f"importance_metric {cls.name!r} takes no metric_options, got {options!r}")
            return {}
        known = sorted(cls.options_model.model_fields)
        for key in options:
            if key not in known:
                raise ValueError(
                    f"metric_options: unknown option {key!r} for importance_metric {cls.name!r}; "
                    f"valid: {', '.join(map(repr, known))}"
                )
        try:
            return cls.options_model.model_validate(options).model_dump()
        except ValidationError as exc:
            problems = "; ".join(
                f"{'.'.join(map(str, e['loc']))}: {e['msg']} (got {e.get('input')!r})" for e in exc.errors()
            )
            raise ValueError(f"metric_options of importance_metric {cls.name!r}: {problems}") from None

    @contextlib.contextmanager
    def calibrating(self, batch: Any) -> Iterator[None]:
        """Context around one calibration batch (default: nothing)."""
        yield

    def attach(self, model: nn.Module, targets: Sequence[PrunableTarget]) -> None:
        self.model = model
        self.targets = targets

    def detach(self) -> None:
        """Remove hooks and free statistics."""

    def on_step(self) -> None:
        """Called by every ``PruningManager.step()``; default: nothing (O(1))."""

    def all_reduce_(self, group: Any = None) -> None:
        """Sum per-rank statistics over the ranks of ``group`` in place (see the module
        docstring); default: nothing to sum."""

    def check_ready(self) -> None:
        """Raise :class:`~artemis.core.errors.CalibrationError` if ``score`` cannot run yet."""

    def score(self, target: PrunableTarget) -> Tensor:  # pragma: no cover - abstract
        """Return the scores of ``target``'s weight: float32, shaped like it, >= 0."""
        raise NotImplementedError(f"{type(self).__name__} must implement score(target)")

    def reset(self) -> None:
        """Forget statistics gathered so far (called after each pruning event)."""

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass
