"""``expert_pruning``: remove whole routed experts from every Mixture-of-Experts layer.

The prunable unit is one routed expert of one MoE layer (its slices of the fused
``gate_up_proj``/``down_proj`` weights and biases, and its router row). ``final_sparsity``
is the **fraction of experts removed**: ``round_half_up(s · experts)`` in every MoE layer
(``layer_sparsity`` overrides it for layers whose MoE module name, e.g.
``model.layers.3.mlp``, matches a pattern). With ``expert_pruning: {budget: global}``
the same total is removed across all layers, lowest normalised score first (each layer's
scores divided by their mean, so layers are comparable), with at least
``num_experts_per_tok`` experts kept in every layer. Shared experts (Qwen2-MoE's
``shared_expert``, DeepSeek's ``shared_experts``) are never removed. A sparsity that would
leave a layer fewer experts than ``num_experts_per_tok`` is refused before anything
changes.

Expert importance (higher = more important; ``importance_metric``):

* ``reap`` (default) — REAP (Lasby et al. 2025): the mean over the tokens routed to the
  expert of ``router weight × ‖expert output‖₂``; needs calibration data (or training
  forward passes).
* ``frequency`` — the share of routed (token, slot) pairs that go to the expert.
* ``magnitude`` — the L2 norm of the expert's weights; needs no data.

Statistics come from a pre-hook on each experts module (:mod:`artemis.metrics.experts`),
which works whatever experts implementation transformers dispatches to.

One-shot: ``manager.apply_pruning(s, calibration_data)`` then ``finalize()``. Progressive
(``step()``): at each pruning event the experts due are masked out of the router (a
forward hook sets their router logits to ``-inf`` and recomputes the top-k weights as
the family's router does, :func:`artemis.arch.moe.route`), so no token reaches them;
``finalize()`` removes them (:func:`artemis.arch.moe.remove_experts`): the kept experts
keep their weights bit for bit (left-shifted), the router keeps their rows,
``num_experts``/``num_local_experts`` shrink and ``num_experts_per_tok`` is capped. With
the same count in every layer the result is a stock model (``save_pretrained`` /
``from_pretrained``, ``generate()`` with the KV cache); with different counts the config
also records compressed-tensors' ``ExpertSparsityConfig`` as ``moe_sparsity_config``,
which :func:`artemis.load_pruned` applies (stock ``from_pretrained`` cannot build it).

Example:
    >>> import torch
    >>> from transformers import MixtralConfig, MixtralForCausalLM
    >>> from artemis import create_pruning_manager
    >>> cfg = MixtralConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
    ...                     num_attention_heads=2, num_key_value_heads=1, num_local_experts=8)
    >>> model = MixtralForCausalLM(cfg)
    >>> mgr = create_pruning_manager({"pruning": {"method": "expert_pruning", "final_sparsity": 0.5,
    ...                                           "importance_metric": "magnitude"}}, model)
    >>> mgr.apply_pruning(0.5)
    >>> _ = mgr.finalize()
    >>> model.config.num_local_experts, model.model.layers[0].mlp.experts.gate_up_proj.shape[0]
    (4, 4)
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any, Iterator, Literal, Mapping, Optional

import torch
import torch.nn as nn
from torch import Tensor

from artemis.arch.moe import MoELayer, find_moe_layers, remove_experts, route, set_expert_config
from artemis.core.errors import CalibrationError, CheckpointError, ConfigError, ModelError
from artemis.core.schedule import round_half_up
from artemis.core.targets import match_pattern
from artemis.methods.base import METHODS, MethodOptions, PruningMethod, TargetFn
from artemis.metrics.base import ImportanceMetric
from artemis.metrics.experts import ExpertUsageStats

__all__ = [
    "EXPERT_METRICS",
    "ExpertPruningOptions",
    "ExpertImportance",
    "ExpertPruningMethod",
    "experts_for_sparsity",
]

logger = logging.getLogger(__name__)

#: importance metrics of whole experts
EXPERT_METRICS = ("reap", "frequency", "magnitude")


class ExpertPruningOptions(MethodOptions):
    """The ``expert_pruning:`` sub-section of the ``pruning:`` section (``method: expert_pruning``).

    Attributes:
        budget: ``layer`` (default): every MoE layer loses the same fraction of its
            experts; ``global``: the same total is removed where the normalised scores are
            lowest, at least ``num_experts_per_tok`` experts kept per layer.

    Example:
        >>> ExpertPruningOptions(budget="global").budget
        'global'
    """

    section = "expert_pruning"

    budget: Literal["layer", "global"] = "layer"


def experts_for_sparsity(sparsity: float, num_experts: int) -> int:
    """Experts removed from a layer of ``num_experts`` at ``sparsity``: ``round_half_up(s·n)``.

    Example:
        >>> experts_for_sparsity(0.5, 8), experts_for_sparsity(0.25, 60), experts_for_sparsity(0.6, 8)
        (4, 15, 5)
    """
    return round_half_up(sparsity * num_experts + 1e-9)


class ExpertImportance(ImportanceMetric):
    """Scores of whole experts (``reap``, ``frequency``, ``magnitude``; see the module
    docstring). Driven by the manager like any metric; the method reads
    :meth:`expert_scores`."""

    default_scope = "layer"

    def __init__(self, name: str) -> None:
        super().__init__()
        self.name = name  # type: ignore[misc]
        self.needs_activations = name in ("reap", "frequency")  # type: ignore[misc]
        self.stats = ExpertUsageStats(lambda: (self._calibrating, None), need_outputs=name == "reap")
        self._calibrating = False
        self._token_mask: Optional[Tensor] = None
        self.layers: list[MoELayer] = []

    def bind(self, layers: list[MoELayer]) -> None:
        self.layers = layers

    def attach(self, model: nn.Module, targets: Any) -> None:
        super().attach(model, targets)
        if self.needs_activations:
            for layer in self.layers:
                self.stats.attach(layer.experts, layer.experts_name)

    @contextlib.contextmanager
    def calibrating(self, batch: Any) -> Iterator[None]:
        mask = batch.get("attention_mask") if isinstance(batch, Mapping) else None
        token_mask = mask.bool() if isinstance(mask, Tensor) and mask.dim() == 2 else None
        self.stats.state = lambda: (True, token_mask)
        self._calibrating = True
        try:
            yield
        finally:
            self._calibrating = False
            self.stats.state = lambda: (self._calibrating, None)

    def check_ready(self) -> None:
        if not self.needs_activations:
            return
        missing = [layer.experts_name for layer in self.layers if layer.experts_name not in self.stats.count]
        if missing:
            raise CalibrationError(
                f"importance_metric {self.name!r} of expert_pruning has no routing statistics for "
                f"{len(missing)} of {len(self.layers)} MoE layers (for example {missing[0]!r}): pass "
                "calibration_data to manager.apply_pruning(sparsity, calibration_data), run "
                "manager.calibrate(batches), or train in train mode before the pruning event"
            )

    @torch.no_grad()
    def expert_scores(self, layer: MoELayer) -> Tensor:
        """float64 ``(experts,)`` scores of ``layer``'s experts (current indices)."""
        n = layer.num_experts
        if self.name == "magnitude":
            sq = torch.zeros(n, dtype=torch.float64)
            for pn in layer.expert_params():
                p = getattr(layer.experts, pn).detach()
                sq += p.to(torch.float64).pow(2).reshape(n, -1).sum(1).cpu()
            return sq.sqrt()
        key = layer.experts_name
        count = self.stats.count[key]
        if self.name == "frequency":
            total = float(count.sum())
            return count / total if total > 0 else count
        return torch.where(count > 0, self.stats.reap[key] / count.clamp_min(1), torch.zeros_like(count))

    def reset(self) -> None:
        self.stats.reset()

    def detach(self) -> None:
        self.stats.remove()
        self.reset()

    def state_dict(self) -> dict:
        return self.stats.state_dict() if self.needs_activations else {}

    def load_state_dict(self, state: dict) -> None:
        if state:
            self.stats.load_state_dict(state)


@METHODS.register("expert_pruning")
class ExpertPruningMethod(PruningMethod):
    """Removal of whole routed experts; see the module docstring.

    Lifecycle: ``setup`` (finds the MoE layers, checks the counts; nothing changed) →
    ``compute_masks`` at each event (masks the newly removed experts out of the router;
    returns no weight masks) → ``remove`` (router hooks off) → ``finalize`` (experts
    deleted, config updated).
    """

    name = "expert_pruning"
    structural = True
    supported_metrics = EXPERT_METRICS
    default_metric = "reap"
    options_models = (ExpertPruningOptions,)

    @classmethod
    def create_metric(cls, name: str, **options: Any) -> ImportanceMetric:
        if options:
            raise ConfigError(
                f"pruning.metric_options {sorted(options)} are not used by method 'expert_pruning' "
                "(it scores whole experts with its own statistics); remove them"
            )
        return ExpertImportance(name)

    def setup(self) -> None:
        cfg = self.config
        for key in ("targets", "scope", "pattern"):
            if getattr(cfg, key) is not None:
                raise ConfigError(
                    f"pruning.{key} is not used by method 'expert_pruning' (it removes whole experts); remove it"
                )
        if cfg.exclude:
            raise ConfigError(
                "pruning.exclude is not used by method 'expert_pruning' (it removes whole experts; shared "
                "experts are never removed); remove it"
            )
        self.layers: list[MoELayer] = find_moe_layers(self.model, self.adapter)
        if not self.layers:
            raise ModelError(
                f"method 'expert_pruning' needs a Mixture-of-Experts model; {type(self.model).__name__} "
                f"(architecture {self.adapter.name!r}) has no fused-experts layer in its transformer blocks"
            )
        # an unknown 3-D layout elsewhere in the blocks is refused here too, before anything changes
        from artemis.core.targets import find_targets

        find_targets(self.model, block_prefixes=self.adapter.block_prefixes())
        self.routing = self.adapter.moe_routing
        if self.routing is None:
            raise ModelError(
                f"method 'expert_pruning' does not support architecture {self.adapter.name!r} yet (its router's "
                "routing cannot be reproduced without the removed experts); supported: Mixtral, Qwen2-MoE, "
                "Qwen3-MoE, OLMoE, GPT-OSS"
            )
        self.original = [layer.num_experts for layer in self.layers]
        self.budget = cfg.expert_pruning.budget if cfg.expert_pruning is not None else "layer"
        for pattern in cfg.layer_sparsity:
            if not any(match_pattern(pattern, layer.name) for layer in self.layers):
                raise ModelError(
                    f"pruning.layer_sparsity: pattern {pattern!r} matches none of the {len(self.layers)} MoE "
                    f"modules (for example {self.layers[0].name!r})"
                )
        self.finals = [self._resolve(layer) for layer in self.layers]
        self._counts(lambda f: f)  # raises now for a final sparsity that leaves too few experts
        self.removed: list[set[int]] = [set() for _ in self.layers]
        self.last_scores: dict[int, list[float]] = {}
        self._hooks: list[Any] = []
        self._finalized = False
        self._numel = [layer.expert_numel() for layer in self.layers]
        self._bytes = [layer.expert_bytes() for layer in self.layers]
        metric = self.manager.metric
        if isinstance(metric, ExpertImportance):
            metric.bind(self.layers)

    def _resolve(self, layer: MoELayer) -> Optional[float]:
        for pattern, s in self.config.layer_sparsity.items():
            if match_pattern(pattern, layer.name):
                return s
        return None

    def _counts(self, target_fn: TargetFn) -> list[int]:
        """Experts removed per layer at this event (layer budget) or in total (global)."""
        counts = []
        for layer, n, final in zip(self.layers, self.original, self.finals):
            s = target_fn(self.config.final_sparsity if final is None else final)
            c = experts_for_sparsity(s, n)
            if n - c < layer.top_k:
                raise ConfigError(
                    f"expert_pruning: sparsity {s:g} removes {c} of the {n} experts of {layer.name}, leaving "
                    f"{n - c}, fewer than num_experts_per_tok={layer.top_k}; use at most "
                    f"{(n - layer.top_k) / n:g}"
                )
            counts.append(c)
        return counts

    def masked_params(self) -> dict[str, nn.Parameter]:
        return {}

    # ------------------------------------------------------------ choosing experts
    def compute_masks(self, target_fn: TargetFn, metric: ImportanceMetric, **event: Any) -> dict[str, Tensor]:
        counts = self._counts(target_fn)  # may raise; nothing changed yet
        scorer = metric if isinstance(metric, ExpertImportance) else ExpertImportance("magnitude")
        if scorer.layers is not self.layers:
            scorer.bind(self.layers)
        scores = [scorer.expert_scores(layer) for layer in self.layers]
        if self.budget == "global":
            chosen = self._global_choice(scores, sum(counts))
        else:
            chosen = []
            for i, c in enumerate(counts):
                new = c - len(self.removed[i])
                order = sorted(
                    (e for e in range(self.original[i]) if e not in self.removed[i]),
                    key=lambda e, s=scores[i]: (float(s[e]), e),
                )
                chosen.append(order[: max(new, 0)])
        self.last_scores = {i: [float(v) for v in s] for i, s in enumerate(scores)}
        for i, new in enumerate(chosen):
            if new:
                self.removed[i].update(new)
                logger.info("expert_pruning: %s: removed experts %s", self.layers[i].name, sorted(new))
        self._install_router_masks()
        return {}

    def _global_choice(self, scores: list[Tensor], total: int) -> list[list[int]]:
        already = sum(len(r) for r in self.removed)
        new = total - already
        cands = []
        for i, s in enumerate(scores):
            mean = float(s.mean())
            for e in range(self.original[i]):
                if e not in self.removed[i]:
                    cands.append((float(s[e]) / mean if mean > 0 else 0.0, i, e))
        cands.sort()
        chosen: list[list[int]] = [[] for _ in self.layers]
        left = [n - len(r) for n, r in zip(self.original, self.removed)]
        for _, i, e in cands:
            if new <= 0:
                break
            if left[i] - 1 < self.layers[i].top_k:
                continue
            chosen[i].append(e)
            left[i] -= 1
            new -= 1
        return chosen

    # ------------------------------------------------------------- router masking
    def _install_router_masks(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []
        for i, layer in enumerate(self.layers):
            if self.removed[i]:
                self._hooks.append(layer.router.register_forward_hook(self._router_hook(i)))

    def _router_hook(self, i: int):
        layer = self.layers[i]
        removed = torch.tensor(sorted(self.removed[i]), dtype=torch.long)
        routing = self.routing

        def hook(module: nn.Module, args: tuple, output: Any) -> Any:
            if not (isinstance(output, tuple) and len(output) == 3):
                return output
            logits = output[0]
            masked = logits.clone()
            masked[..., removed.to(logits.device)] = float("-inf")
            top, idx = route(routing, layer.router, masked.reshape(-1, masked.shape[-1]))
            return masked, top.reshape(output[1].shape), idx.reshape(output[2].shape)

        return hook

    def install(self) -> None:
        self._install_router_masks()

    def remove(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []

    def finalize(self) -> None:
        if self._finalized:
            raise ModelError("expert_pruning: finalize() was already called")
        self.remove()
        counts: list[Optional[int]] = [None] * (self.adapter.num_blocks or 0)
        for i, layer in enumerate(self.layers):
            keep = [e for e in range(self.original[i]) if e not in self.removed[i]]
            remove_experts(layer, keep)
            counts[layer.block_index] = len(keep)
        config = getattr(self.model, "config", None)
        if config is not None:
            set_expert_config(config, counts)
        self._finalized = True

    # ---------------------------------------------------------------- reporting
    def parameter_counts(self) -> tuple[int, int]:
        pruned = sum(len(r) * per for r, per in zip(self.removed, self._numel))
        total = sum(n * per for n, per in zip(self.original, self._numel))
        return pruned, total

    def update_pruning_metrics(self, metrics: dict[str, Any]) -> None:
        from artemis.core.sizing import MIB

        baseline = metrics["baseline_model_size_mb"] * MIB
        size = baseline - sum(len(r) * b for r, b in zip(self.removed, self._bytes))
        removed = sum(len(r) for r in self.removed)
        total = sum(self.original)
        metrics.update(
            {
                "current_sparsity": removed / total if total else 0.0,
                "model_size_reduction": 1.0 - size / baseline if baseline else 0.0,
                "compressed_model_size_mb": size / MIB,
                "experts_total": total,
                "experts_removed": removed,
            }
        )

    def scope(self, metric: ImportanceMetric) -> str:
        return self.budget

    def summary(self) -> dict[str, Any]:
        layers = []
        for i, layer in enumerate(self.layers):
            layers.append(
                {
                    "index": layer.block_index,
                    "name": layer.name,
                    "experts": self.original[i],
                    "removed": sorted(self.removed[i]),
                    "kept": self.original[i] - len(self.removed[i]),
                    "scores": self.last_scores.get(i),
                    "shared_experts": list(layer.shared),
                }
            )
        return {
            "layers": layers,
            "experts_total": sum(self.original),
            "experts_removed": sum(len(r) for r in self.removed),
            "budget": self.budget,
        }

    def state_dict(self) -> dict[str, Any]:
        return {"num_experts": list(self.original), "removed": [sorted(r) for r in self.removed]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not state:
            return
        if [int(n) for n in state.get("num_experts", [])] != self.original:
            raise CheckpointError(
                f"pruning state is for MoE layers of {state.get('num_experts')} experts; this model has {self.original}"
            )
        removed = [set(int(e) for e in r) for r in state.get("removed", [])]
        if len(removed) != len(self.layers) or any(
            any(not 0 <= e < n for e in r) or n - len(r) < layer.top_k
            for r, n, layer in zip(removed, self.original, self.layers)
        ):
            raise CheckpointError(f"pruning state has an invalid list of removed experts: {state.get('removed')}")
        self.removed = removed
        self._install_router_masks()
