"""The pruning-method contract, the options a method owns, and the method registry.

A method decides **what a prunable unit is** (a single weight, an attention head, an
MLP neuron, a whole block) and turns metric scores into keep-masks over parameters.
The manager owns everything that is shared: the schedule, applying masks to weights,
gradients and optimizer state, the kept calibration batches, the state dict and the
summary. The contract, hook by hook, is in the :class:`PruningMethod` docstring.

A method's own config keys are declared as :class:`MethodOptions` models next to its
code (``SparseGPTOptions`` in :mod:`artemis.methods.sparsegpt`, ``OWLOptions`` in
:mod:`artemis.methods.owl`, ``StructuredOptions`` in :mod:`artemis.methods.structured`,
``LayerDropoutOptions`` in :mod:`artemis.methods.layer_dropout`); the method lists them
in ``options_models`` and :class:`~artemis.core.config.PruningConfig` validates them
through the registry (:data:`METHODS`, defined in :mod:`artemis.core.registry` and
re-exported here).

Example:
    >>> from artemis.methods import METHODS
    >>> cls = METHODS.get("structured_sparsity")
    >>> [m.__name__ for m in cls.options_models], cls.supports_pattern
    (['StructuredOptions'], False)
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, ClassVar, Mapping, Optional

import torch.nn as nn
from torch import Tensor

from artemis.core.config import ConfigSection
from artemis.core.registry import METHODS, METRICS
from artemis.core.targets import match_pattern

if TYPE_CHECKING:  # pragma: no cover
    from artemis.core.config import PruningConfig
    from artemis.core.distributed import ShardLayout
    from artemis.core.manager import PruningManager
    from artemis.core.targets import PrunableTarget
    from artemis.metrics.base import ImportanceMetric

__all__ = ["PruningMethod", "MethodOptions", "METHODS", "TargetFn"]

TargetFn = Callable[[float], float]


class MethodOptions(ConfigSection):
    """Base of the options model of a pruning method (a pydantic model).

    Its fields are keys of the ``pruning:`` section: flat keys (``owl_lambda: 0.1``) when
    ``section`` is None, or the keys of a sub-section named ``section``
    (``layer_dropout: {fade_steps: 3}``). Every registered method's options are validated
    with every config (so ``cfg.<key>`` reads a default when the key is not given), and a
    value a method does not accept (see :meth:`in_use`) fails naming the methods that do.
    Flat keys must be unique across all options models and the core keys.
    """

    #: None: the fields are flat keys of the pruning section; else the sub-section's key.
    section: ClassVar[Optional[str]] = None

    def in_use(self, cfg: "PruningConfig") -> list[str]:
        """The settings of these options that make a difference, as shown in an error when
        the configured method does not accept them: a sub-section that is present, or
        the flat keys whose value is not the default."""
        if self.section is not None:
            return [self.section]
        return [
            k
            for k, f in type(self).model_fields.items()
            if getattr(self, k) != f.get_default(call_default_factory=True)
        ]

    def check(self, cfg: "PruningConfig") -> None:
        """Cross-field rules between these options and the rest of ``cfg`` (called when the
        configured method accepts them); raise ``ValueError``. Default: none."""

    def calibration_need(self, cfg: "PruningConfig") -> Optional[str]:
        """The setting (``"reconstruction: sparsegpt"``) that makes every pruning event need
        calibration batches of its own, or None. Default: None."""
        return None


class PruningMethod:
    """Base class of pruning methods. Subclass it and register it with
    ``@METHODS.register("name")``.

    Attributes (class level):
        name: the registered name.
        structural: True when ``finalize()`` changes the architecture (then the export
            writes a dense model).
        supports_sharded_params: True when the method handles FSDP2-sharded (DTensor)
            weights: ``compute_masks`` returns masks of each rank's local shard
            (``param.to_local()``) and finds any threshold that spans shards with
            collectives (see :mod:`artemis.core.distributed`); otherwise the manager
            refuses sharded models.
        supported_metrics: metric names the method accepts; None means every registered
            metric (``layer_dropout`` scores whole layers and lists its own).
        default_metric: the ``importance_metric`` used when the config does not name one
            (None: the config's default, ``magnitude``).
        options_models: the :class:`MethodOptions` models of the config keys the method
            owns; a non-default value of another method's options fails validation.
        supports_pattern: True when the method takes the config's N:M ``pattern``.

    Attributes (instance): ``config`` (the validated
    :class:`~artemis.core.config.PruningConfig`), ``model``, ``adapter`` and ``targets``
    (the :class:`~artemis.core.targets.PrunableTarget` list chosen by ``setup()``). The
    manager is kept as ``manager``; a method may read its public attributes (``metric``,
    ``masks``) but receives what a pruning event needs as arguments.

    Contract — the hooks, in the order the manager calls them:

    At config validation (class methods, no model yet):

    * ``validate_config(cfg)`` — cross-field rules of the method's options; raise
      ``ValueError``. Default: ``check(cfg)`` of each of its options.
    * ``calibration_need(cfg)`` — the setting that makes every pruning event need
      calibration batches (``"scope: owl"``), or None. Default: the first need of its
      options. The manager then refuses to prune before it has batches
      (``set_calibration_data``, or ``apply_pruning(s, calibration_data)``).

    At manager creation:

    * ``create_metric(name, **options)`` (class method) — the metric object the manager
      drives for this method. Default: the registered metric.
    * ``__init__(manager)``, then ``setup()`` — choose the targets; raise
      :class:`~artemis.core.errors.ModelError` before changing anything if the model
      cannot be pruned this way.
    * ``masked_params()`` — ``{key: parameter}`` of every parameter the method may mask;
      the manager keeps these at exactly zero where the mask is ``False``.
    * ``check_sharding(layout, metric)`` — only when some of them are FSDP2-sharded:
      raise :class:`~artemis.core.errors.ModelError` for a layout the method cannot prune.
    * ``install()`` — when pruning is enabled, after the metric's ``attach``: add any
      forward hooks.

    While training and at one-shot prunes:

    * ``on_step()`` — at every ``step()``, after the metric's ``on_step``.
    * ``one_shot_target_fn(sparsity)`` — by ``apply_pruning``/``apply_magnitude_pruning``:
      the target function of a one-shot prune (see below).
    * ``compute_masks(target_fn, metric, *, previous, calibration, sharding)`` — at each
      pruning event: return ``{key: bool keep-mask}`` (each shaped like its parameter, or
      its local shard) for the keys whose mask changes. ``target_fn(final)`` maps a final
      sparsity to the sparsity due now (the schedule); ``previous`` is the read-only
      ``{key: mask}`` of the previous event (empty at the first); ``calibration`` the
      list of kept calibration batches (None unless ``calibration_need`` asked for them);
      ``sharding`` the :class:`~artemis.core.distributed.ShardLayout` (None unless
      FSDP2-sharded). Must not modify the model.
    * ``reconstruct(masks, *, previous, calibration)`` — right after, once the manager
      has checked and stored ``masks`` but before it zeroes the pruned weights: may
      update the kept weights (and change ``masks`` in place; the manager stores them
      again). Returns a JSON-able report (kept as ``manager.last_reconstruction``) or
      None when it did nothing (the default).
    * ``update_pruning_metrics(metrics)`` — after the manager computed its parameter-level
      figures (every event, ``get_pruning_summary()``): adjust them in place. Default:
      nothing.
    * ``parameter_counts()`` — ``(pruned, prunable)`` for those figures, or None to count
      the zeros of the targets (the default).
    * ``scope(metric)`` and ``summary()`` — by ``get_pruning_summary()``: the scope in
      force and extra JSON-able facts.
    * ``state_dict()`` / ``load_state_dict(state)`` — the method's part of the manager's
      checkpoint.

    At the end:

    * ``remove()`` — at ``finalize()`` and ``close()``: remove the hooks of ``install()``.
    * ``finalize()`` — once, after the masks were folded into the weights and every hook
      removed: make the pruning permanent (a structural method rebuilds the model smaller).
    """

    name: ClassVar[str] = "base"
    structural: ClassVar[bool] = False
    supports_sharded_params: ClassVar[bool] = False
    supported_metrics: ClassVar[Optional[tuple[str, ...]]] = None
    default_metric: ClassVar[Optional[str]] = None
    options_models: ClassVar[tuple[type[MethodOptions], ...]] = ()
    supports_pattern: ClassVar[bool] = False

    def __init__(self, manager: "PruningManager") -> None:
        self.manager = manager
        self.config = manager.config
        self.model: nn.Module = manager.model
        self.adapter = manager.adapter
        self.targets: list["PrunableTarget"] = []

    # ------------------------------------------------------------ config (class level)
    @classmethod
    def validate_config(cls, cfg: "PruningConfig") -> None:
        """Cross-field rules of this method's options (default: each options model's
        :meth:`MethodOptions.check`); raise ``ValueError``."""
        for model in cls.options_models:
            options = cfg.method_options(model)
            if options is not None:
                options.check(cfg)

    @classmethod
    def calibration_need(cls, cfg: "PruningConfig") -> Optional[str]:
        """The setting that makes every pruning event need calibration batches, or None."""
        for model in cls.options_models:
            options = cfg.method_options(model)
            need = options.calibration_need(cfg) if options is not None else None
            if need is not None:
                return need
        return None

    @classmethod
    def create_metric(cls, name: str, **options: Any) -> "ImportanceMetric":
        """The metric object the manager drives for this method (default: the registered
        one, built with the config's ``metric_options``)."""
        return METRICS.get(name)(**options)

    # ------------------------------------------------------------------ lifecycle
    def setup(self) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def masked_params(self) -> dict[str, nn.Parameter]:
        return {t.key: t.param for t in self.targets}

    def check_sharding(self, layout: "ShardLayout", metric: "ImportanceMetric") -> None:
        """Raise :class:`~artemis.core.errors.ModelError` at manager creation when this
        method cannot prune the FSDP2 ``layout`` with ``metric``."""

    def install(self) -> None:
        pass

    def on_step(self) -> None:
        """Called by every ``PruningManager.step()`` (after the metric's); default: nothing."""

    def compute_masks(
        self,
        target_fn: TargetFn,
        metric: "ImportanceMetric",
        *,
        previous: Mapping[str, Tensor],
        calibration: Optional[list] = None,
        sharding: Optional["ShardLayout"] = None,
    ) -> dict[str, Tensor]:  # pragma: no cover - abstract
        raise NotImplementedError

    def reconstruct(
        self, masks: dict[str, Tensor], *, previous: Mapping[str, Tensor], calibration: Optional[list] = None
    ) -> Optional[dict[str, Any]]:
        """Update the kept weights after ``masks`` were chosen (see the class docstring);
        default: nothing (None)."""
        return None

    def update_pruning_metrics(self, metrics: dict[str, Any]) -> None:
        """Adjust the manager's ``pruning_metrics`` in place (default: nothing)."""

    def remove(self) -> None:
        pass

    def finalize(self) -> None:
        pass

    # -------------------------------------------------------------------- summary
    def scope(self, metric: "ImportanceMetric") -> Optional[str]:
        """The scope in force, for the summary (default: the config's)."""
        return self.config.scope

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

    # -------------------------------------------------------------------- helpers
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
        for pattern, s in self.config.layer_sparsity.items():
            if match_pattern(pattern, name):
                return s
        return None
