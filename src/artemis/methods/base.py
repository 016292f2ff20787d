"""The pruning-method contract and its registry.

A method decides **what a prunable unit is** (a single weight, an attention head, an
MLP neuron, a whole block) and turns metric scores into keep-masks over parameters.
The manager owns everything that is shared: the schedule, applying masks to weights,
gradients and optimizer state, the state dict and the summary.

Contract for a new method (subclass :class:`PruningMethod` and register it):

* ``setup()`` — choose the targets; raise :class:`~artemis.core.errors.ModelError` before
  changing anything if the model cannot be pruned this way.
* ``masked_params()`` — ``{key: parameter}`` of every parameter the method may mask;
  the manager keeps these at exactly zero where the mask is ``False``.
* ``compute_masks(target_fn, metric)`` — return ``{key: bool mask}`` for the current
  pruning event; ``target_fn(final)`` maps a final sparsity to the sparsity due now
  (the schedule). Must not modify the model.
* ``on_step()`` — called at every ``step()``, for per-step state of the method (optional).
* ``install()`` / ``remove()`` — add and remove any forward hooks (optional).
* ``finalize()`` — make the pruning permanent (for structural methods: rebuild the
  model smaller); called once, after masks are folded and hooks removed.
* ``summary()`` — extra JSON-able facts for ``get_pruning_summary()``.
* ``parameter_counts()`` — optional ``(pruned, prunable)`` override of the counts.
* FSDP2: set ``supports_sharded_params = True`` only if ``compute_masks`` returns masks
  of each rank's local shard (``param.to_local()``) and finds any threshold that spans
  shards with collectives (see :mod:`artemis.core.distributed`); otherwise the manager
  refuses sharded models. ``check_sharding(layout)`` may refuse particular layouts.
* ``supported_metrics`` / ``create_metric(name)`` — a method that scores its own units
  (``layer_dropout`` scores whole layers) lists the metric names it accepts and builds
  its own metric object; the default (``None``) accepts every registered metric.
* ``update_pruning_metrics(metrics)`` — adjust ``manager.pruning_metrics`` in place
  after the manager computed its parameter-level figures (optional).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, ClassVar, Optional

import torch.nn as nn
from torch import Tensor

from artemis.core.registry import Registry

if TYPE_CHECKING:  # pragma: no cover
    from artemis.core.manager import PruningManager
    from artemis.core.targets import PrunableTarget
    from artemis.metrics.base import ImportanceMetric

__all__ = ["PruningMethod", "METHODS", "TargetFn"]

TargetFn = Callable[[float], float]


class PruningMethod:
    """Base class; see the module docstring for the contract."""

    name: ClassVar[str] = "base"
    #: True when finalize() changes the architecture (then export writes a dense model).
    structural: ClassVar[bool] = False
    #: True when the method handles FSDP2-sharded (DTensor) weights: scores and masks of
    #: each rank's local shard, collectives for anything that spans shards.
    supports_sharded_params: ClassVar[bool] = False
    #: Metric names this method accepts; None means every registered metric.
    supported_metrics: ClassVar[Optional[tuple[str, ...]]] = None

    def __init__(self, manager: "PruningManager") -> None:
        self.manager = manager
        self.config = manager.config
        self.model: nn.Module = manager.model
        self.adapter = manager.adapter
        self.targets: list["PrunableTarget"] = []

    @classmethod
    def create_metric(cls, name: str, **options: Any) -> "ImportanceMetric":
        """The metric object the manager drives for this method (default: the registered
        one, built with the config's ``metric_options``)."""
        from artemis.metrics import METRICS

        return METRICS.get(name)(**options)

    def update_pruning_metrics(self, metrics: dict[str, Any]) -> None:
        """Adjust the manager's ``pruning_metrics`` in place (default: nothing)."""

    def setup(self) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def masked_params(self) -> dict[str, nn.Parameter]:
        return {t.key: t.param for t in self.targets}

    def compute_masks(
        self, target_fn: TargetFn, metric: "ImportanceMetric"
    ) -> dict[str, Tensor]:  # pragma: no cover - abstract
        raise NotImplementedError

    def check_sharding(self, layout: Any) -> None:
        """Raise :class:`~artemis.core.errors.ModelError` at manager creation when this
        method cannot prune the FSDP2 layout (an :class:`artemis.core.distributed.ShardLayout`)."""

    def install(self) -> None:
        pass

    def on_step(self) -> None:
        """Called by every ``PruningManager.step()`` (after the metric's); default: nothing."""

    def remove(self) -> None:
        pass

    def finalize(self) -> None:
        pass

    def summary(self) -> dict[str, Any]:
        return {}

    def parameter_counts(self) -> Optional[tuple[int, int]]:
        """``(pruned, prunable)`` parameter counts for the summary, or None to count the
        zeros of the targets (structural methods override this: after ``finalize()``
        their pruned parameters are gone, not zero)."""
        return None

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass

    def one_shot_target_fn(self, sparsity: float) -> TargetFn:
        """Target function of a one-shot prune to ``sparsity``: the default group gets
        exactly ``sparsity``; ``layer_sparsity`` overrides keep their ratio to
        ``final_sparsity`` (capped below 1)."""
        final = self.config.final_sparsity

        def fn(group_final: float) -> float:
            if final <= 0 or group_final == final:
                return sparsity
            return min(group_final * sparsity / final, 0.999)

        fn.one_shot = True  # type: ignore[attr-defined]  # this event's target is the final one
        return fn

    def resolve_sparsity(self, name: str) -> Optional[float]:
        """The ``layer_sparsity`` override of module ``name``, if any (first match wins)."""
        from artemis.core.targets import match_pattern

        for pattern, s in self.config.layer_sparsity.items():
            if match_pattern(pattern, name):
                return s
        return None


METHODS: Registry[type[PruningMethod]] = Registry("method")
