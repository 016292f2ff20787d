"""``layer_dropout``: drop whole transformer layers, then remove them from the model.

The prunable unit is a whole block (a decoder/encoder layer). ``final_sparsity`` is the
**fraction of layers removed**; the number of layers is ``round_half_up(s · L)`` (0.4 of
32 layers removes 13, 0.5 of 8 removes 4; see :func:`layers_for_sparsity`). A sparsity
that would remove every layer is refused, and so is one > 0 that removes none.

Layer importance (higher = more important; the least important layer goes first):

* ``magnitude`` — the L2 norm of all of the layer's parameters together. Free, needs
  no data; a weak proxy (see ``docs/benchmarks/layer_dropout.md``).
* ``gradient_sensitivity`` — ``Σ_steps Σ_{w in layer} |w · ∂L/∂w|`` (first-order Taylor
  estimate of the loss change when the layer's weights are zeroed), accumulated at every
  ``step()`` after ``backward()``, or over calibration batches that carry labels
  (``apply_pruning(s, calibration_data)``).
* ``activation`` — Block Influence (ShortGPT, Men et al. 2024): the mean over tokens of
  ``1 − cos(x_in, x_out)`` between the residual stream entering and leaving the layer,
  gathered by forward hooks on the blocks during training or calibration.

Progressive use (``step()``): at each pruning event the schedule's sparsity ``s(t)`` gives
the number of layers due; the missing ones are dropped, least important first, scored on
the layers that remain with the statistics gathered since the previous event (so the
scores of later events see the network with earlier layers already gone). With a
reasonable ``pruning_interval`` one layer becomes due per event; when several become due
at one event they are dropped together by the same scores.

A dropped layer is the identity on the residual stream: its block's ``forward`` is
replaced (on the instance, so parameter names and ``state_dict`` keys do not change) by a
gate that returns the block's input hidden states, in the block's own return structure
(a tensor in transformers 5.x, a tuple in older or custom blocks). With
``layer_dropout.fade_steps: N`` the output is instead ``x + α·(f(x) − x)`` with ``α``
falling linearly from ``(N−1)/N`` to 0 over the next N steps. A dropped layer's
parameters are not masked (``masked_params()`` is empty): the gate never uses them, so
they get no gradient; they are deleted by ``finalize()``. In eval mode with a KV cache
(generation before ``finalize()``; note HF models make a cache whenever
``config.use_cache`` is true) a dropped block still runs, output discarded, so the cache
stays consistent; in training mode it never runs. ``finalize()`` removes that cost.

``finalize()`` deletes the dropped blocks (:func:`artemis.arch.layers.remove_blocks`):
it renumbers each kept attention's ``layer_idx``, filters ``config.layer_types`` and sets
``config.num_hidden_layers``, so ``save_pretrained``/``from_pretrained`` and
``generate(use_cache=True)`` work with stock transformers.

Example:
    >>> from transformers import LlamaConfig, LlamaForCausalLM
    >>> from artemis import create_pruning_manager
    >>> cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
    ...                   num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2)
    >>> model = LlamaForCausalLM(cfg)
    >>> mgr = create_pruning_manager(
    ...     {"pruning": {"method": "layer_dropout", "final_sparsity": 0.5}}, model)
    >>> mgr.apply_pruning(0.5)
    >>> mgr.get_pruning_summary()["layers_dropped"] == sorted(mgr.method.drop_order)
    True
    >>> _ = mgr.finalize()
    >>> model.config.num_hidden_layers, len(model.model.layers)
    (2, 2)
"""

from __future__ import annotations

import logging
import warnings
from typing import Any

import torch.nn as nn
from pydantic import field_validator
from torch import Tensor

from artemis.arch.gates import BlockGate
from artemis.arch.layers import check_block_removal, remove_blocks
from artemis.core.errors import CheckpointError, ConfigError, ModelError
from artemis.core.schedule import round_half_up
from artemis.core.sizing import MIB, dense_tensor_bytes
from artemis.methods.base import METHODS, MethodOptions, PruningMethod, TargetFn
from artemis.metrics.base import ImportanceMetric
from artemis.metrics.blocks import (
    LAYER_METRICS,
    LayerImportance,
    influence_terms,
    layer_gradient_sensitivity,
    layer_magnitude,
)

__all__ = [
    "LAYER_METRICS",
    "layers_for_sparsity",
    "influence_terms",
    "layer_magnitude",
    "layer_gradient_sensitivity",
    "choose_layers_to_drop",
    "BlockGate",
    "LayerImportance",
    "LayerDropoutMethod",
    "LayerDropoutOptions",
]

logger = logging.getLogger(__name__)

#: Importance metrics at the level of whole layers.
# Block-forward arguments that carry a KV cache (transformers 5.x and 4.x names).


class LayerDropoutOptions(MethodOptions):
    """The ``layer_dropout:`` sub-section of the ``pruning:`` section (``method: layer_dropout``).

    Attributes:
        fade_steps: a dropped layer's contribution to the residual stream is scaled down
            linearly to zero over this many ``step()`` calls before it becomes the identity
            (0 or 1: cut at once).

    Example:
        >>> LayerDropoutOptions(fade_steps=3).fade_steps
        3
    """

    section = "layer_dropout"

    fade_steps: int = 0

    @field_validator("fade_steps")
    @classmethod
    def _check_fade(cls, v: int) -> int:
        if v < 0:
            raise ValueError(f"fade_steps must be >= 0 steps, got {v!r}")
        return v


# ------------------------------------------------------------------ pure functions
def layers_for_sparsity(sparsity: float, num_layers: int) -> int:
    """Number of layers removed at ``sparsity``: ``round_half_up(sparsity · num_layers)``.

    Example:
        >>> layers_for_sparsity(0.4, 32), layers_for_sparsity(0.5, 8), layers_for_sparsity(0.25, 6)
        (13, 4, 2)
    """
    return round_half_up(sparsity * num_layers + 1e-9)


def choose_layers_to_drop(scores: dict[int, float], n: int) -> list[int]:
    """The ``n`` layers with the lowest scores, least important first (ties: lower index).

    Example:
        >>> choose_layers_to_drop({0: 5.0, 1: 0.5, 2: 0.5, 3: 1.0}, 3)
        [1, 2, 3]
    """
    if n > len(scores):
        raise ValueError(f"cannot drop {n} layers out of {len(scores)} candidates")
    return [i for i, _ in sorted(scores.items(), key=lambda kv: (kv[1], kv[0]))[:n]]


# --------------------------------------------------------------------- the gate


# ------------------------------------------------------------------- the metric


# ------------------------------------------------------------------- the method
@METHODS.register("layer_dropout")
class LayerDropoutMethod(PruningMethod):
    """Whole-layer dropout, then removal at ``finalize()``; see the module docstring.

    Lifecycle: ``setup`` (checks the model can lose layers; nothing changed) →
    ``compute_masks`` at each pruning event (gates the newly dropped layers; returns no
    masks) → ``remove`` (gates off) → ``finalize`` (blocks deleted, config updated).
    """

    name = "layer_dropout"
    structural = True
    supported_metrics = LAYER_METRICS
    options_models = (LayerDropoutOptions,)

    @classmethod
    def create_metric(cls, name: str, **options: Any) -> ImportanceMetric:
        if options:
            raise ConfigError(
                f"pruning.metric_options {sorted(options)} are not used by method 'layer_dropout' "
                "(it scores whole layers with its own statistics); remove them"
            )
        return LayerImportance(name)

    def setup(self) -> None:
        cfg = self.config
        for key in ("targets", "scope"):
            if getattr(cfg, key) is not None:
                raise ConfigError(
                    f"pruning.{key} is not used by method 'layer_dropout' (it removes whole layers); remove it"
                )
        for key in ("exclude", "layer_sparsity"):
            if getattr(cfg, key):
                raise ConfigError(
                    f"pruning.{key} is not used by method 'layer_dropout' (it removes whole layers); remove it"
                )
        check_block_removal(self.adapter)
        assert self.adapter.blocks is not None
        self.blocks: list[nn.Module] = list(self.adapter.blocks)
        self.num_layers = len(self.blocks)
        self.prefixes = self.adapter.block_prefixes()
        n_final = layers_for_sparsity(cfg.final_sparsity, self.num_layers)
        self._check_count(n_final, cfg.final_sparsity, "pruning.final_sparsity")
        if cfg.final_sparsity > 0 and n_final == 0:
            raise ConfigError(
                f"pruning.final_sparsity {cfg.final_sparsity} of {self.num_layers} layers rounds to 0 layers "
                f"removed; with layer_dropout it is the fraction of layers removed, use at least "
                f"{0.5 / self.num_layers:.4g} to remove one"
            )
        self.fade_steps = cfg.layer_dropout.fade_steps if cfg.layer_dropout is not None else 0
        self.block_params: list[list[nn.Parameter]] = []
        self.block_numel: list[int] = []
        self.block_bytes: list[int] = []
        seen: set[int] = set()
        for block in self.blocks:
            params = [p for p in block.parameters() if id(p) not in seen]
            seen.update(id(p) for p in params)
            self.block_params.append(params)
            self.block_numel.append(sum(p.numel() for p in params))
            self.block_bytes.append(
                sum(dense_tensor_bytes(p) for p in params)
                + sum(dense_tensor_bytes(b) for _, b in block.named_buffers() if _is_persistent(block, _))
            )
        self.drop_order: list[int] = []
        self.dropped: set[int] = set()
        self.fade_age: dict[int, int] = {}
        self.gates: dict[int, BlockGate] = {}
        self.last_scores: dict[int, float] = {}
        self._finalized = False
        metric = self.manager.metric
        if isinstance(metric, LayerImportance):
            metric.bind(self)

    def _check_count(self, n: int, sparsity: float, field: str) -> None:
        if n >= self.num_layers:
            raise ConfigError(
                f"{field} {sparsity} of {self.num_layers} layers removes {n} layers, leaving none; "
                f"layer_dropout keeps at least one layer (use below {(self.num_layers - 0.5) / self.num_layers:.4g})"
            )

    def masked_params(self) -> dict[str, nn.Parameter]:
        return {}

    def active_layers(self) -> list[int]:
        """Original indices of the layers not dropped."""
        return [i for i in range(self.num_layers) if i not in self.dropped]

    def _scorer(self, metric: ImportanceMetric) -> LayerImportance:
        if isinstance(metric, LayerImportance):
            return metric
        scorer = LayerImportance(getattr(metric, "name", "?"))
        scorer.bind(self)
        return scorer

    def compute_masks(self, target_fn: TargetFn, metric: ImportanceMetric, **event: Any) -> dict[str, Tensor]:
        # event (previous masks, calibration, sharding) is not needed: the dropped layers are self.dropped
        sparsity = target_fn(self.config.final_sparsity)
        due = layers_for_sparsity(sparsity, self.num_layers)
        self._check_count(due, sparsity, "sparsity")
        new = due - len(self.dropped)
        if new <= 0:
            return {}
        active = self.active_layers()
        scores = self._scorer(metric).layer_scores(active)  # may raise; nothing changed yet
        chosen = choose_layers_to_drop(scores, new)
        self.last_scores = scores
        if new > 1:
            logger.info("layer_dropout: %d layers due at once (%s)", new, chosen)
        for index in chosen:
            self._drop(index)
        logger.info(
            "layer_dropout: dropped layers %s (scores %s); %d of %d dropped",
            chosen,
            [round(scores[i], 6) for i in chosen],
            len(self.dropped),
            self.num_layers,
        )
        return {}

    def _alpha(self, index: int) -> float:
        if self.fade_steps <= 1:
            return 0.0
        return max(0.0, 1.0 - self.fade_age.get(index, self.fade_steps) / self.fade_steps)

    def _drop(self, index: int) -> None:
        self.drop_order.append(index)
        self.dropped.add(index)
        if self.fade_steps > 1:
            self.fade_age[index] = 1
        gate = BlockGate(self.blocks[index], self._alpha(index))
        self.gates[index] = gate
        gate.install()  # also with pruning disabled: apply_pruning() must take effect

    def on_step(self) -> None:
        """Called by every ``PruningManager.step()``: advance the fade-outs."""
        self.advance_fades()

    def advance_fades(self) -> None:
        """One step of every fade-out in progress."""
        for index in list(self.fade_age):
            if self.fade_age[index] < self.fade_steps:
                self.fade_age[index] += 1
            self.gates[index].alpha = self._alpha(index)
            if self.gates[index].alpha == 0.0:
                del self.fade_age[index]

    def install(self) -> None:
        for gate in self.gates.values():
            if not gate.installed:
                gate.install()

    def remove(self) -> None:
        for gate in self.gates.values():
            gate.remove()

    def finalize(self) -> None:
        if self._finalized:
            raise ModelError("layer_dropout: finalize() was already called")
        for gate in self.gates.values():
            gate.remove()
        if self.fade_age:
            logger.warning("layer_dropout: finalize() while layers %s are still fading out", sorted(self.fade_age))
        keep = self.active_layers()
        if len(keep) < self.num_layers:
            remove_blocks(self.adapter, keep)
        self._finalized = True
        self.gates = {}
        self.blocks = [self.blocks[i] for i in keep]
        self.block_params = [[] for _ in range(self.num_layers)]

    # ---------------------------------------------------------------- reporting
    def update_pruning_metrics(self, metrics: dict[str, Any]) -> None:
        total_numel = sum(self.block_numel)
        pruned_numel = sum(self.block_numel[i] for i in self.dropped)
        baseline = metrics["baseline_model_size_mb"] * MIB
        size = baseline - sum(self.block_bytes[i] for i in self.dropped)
        metrics.update(
            {
                "current_sparsity": len(self.dropped) / self.num_layers,
                "parameters_pruned": pruned_numel,
                "parameters_prunable": total_numel,
                "model_size_reduction": 1.0 - size / baseline if baseline else 0.0,
                "compressed_model_size_mb": size / MIB,
                "layers_total": self.num_layers,
                "layers_dropped": len(self.dropped),
            }
        )

    def summary(self) -> dict[str, Any]:
        layers = []
        for i in range(self.num_layers):
            status = "kept"
            if i in self.dropped:
                status = "fading" if i in self.fade_age else "dropped"
            layers.append(
                {
                    "index": i,
                    "name": self.prefixes[i],
                    "numel": self.block_numel[i],
                    "status": status,
                    "score": self.last_scores.get(i),
                }
            )
        return {
            "scope": "layer",
            "layers": layers,
            "layers_total": self.num_layers,
            "layers_dropped": sorted(self.dropped),
            "drop_order": list(self.drop_order),
            "layers_remaining": self.num_layers - len(self.dropped),
            "fade_steps": self.fade_steps,
        }

    def state_dict(self) -> dict[str, Any]:
        return {
            "num_layers": self.num_layers,
            "drop_order": list(self.drop_order),
            "fade_age": dict(self.fade_age),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not state:
            return
        if int(state.get("num_layers", -1)) != self.num_layers:
            raise CheckpointError(
                f"pruning state is for a model with {state.get('num_layers')} layers; this model has {self.num_layers}"
            )
        order = [int(i) for i in state.get("drop_order", [])]
        if (
            len(set(order)) != len(order)
            or any(not 0 <= i < self.num_layers for i in order)
            or len(order) >= self.num_layers
        ):
            raise CheckpointError(f"pruning state has an invalid drop_order {order} for {self.num_layers} layers")
        for gate in self.gates.values():
            gate.remove()
        self.gates, self.drop_order, self.dropped, self.fade_age = {}, [], set(), {}
        fade = {int(k): int(v) for k, v in state.get("fade_age", {}).items()}
        for index in order:
            self._drop(index)
            if index in fade:
                self.fade_age[index] = fade[index]
            else:
                self.fade_age.pop(index, None)
            self.gates[index].alpha = self._alpha(index)
        self.last_scores = {}


def _is_persistent(module: nn.Module, name: str) -> bool:
    owner_name, _, buf = name.rpartition(".")
    owner = module.get_submodule(owner_name) if owner_name else module
    return buf not in getattr(owner, "_non_persistent_buffers_set", set())


def __getattr__(name: str) -> Any:
    # The per-batch Block Influence term was called block_influence here; that name is now
    # the model-level score in artemis.metrics.blocks, and this term is influence_terms.
    if name == "block_influence":
        warnings.warn(
            "artemis.methods.layer_dropout.block_influence is now artemis.metrics.blocks.influence_terms",
            DeprecationWarning,
            stacklevel=2,
        )
        return influence_terms
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
