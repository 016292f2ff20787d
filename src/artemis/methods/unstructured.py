"""``magnitude_progressive``: unstructured pruning of individual weights.

Each target weight gets a keep-mask from the configured metric's scores:

* ``scope: global`` — one threshold across every target of the same sparsity group
  (the targets sharing a final sparsity; ``layer_sparsity`` overrides form their own
  groups), found exactly without concatenating scores (:func:`artemis.masks.global_masks`);
* ``scope: layer`` — each weight matrix pruned to the target on its own;
* ``scope: row`` — each output row pruned to the target on its own (Wanda's choice).

Weights pruned at an earlier event stay pruned (their scores are zeroed before the
next threshold is found), so masks only ever shrink during a run.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Callable

import torch
from torch import Tensor

from artemis.masks import global_masks, layer_mask, row_masks
from artemis.methods.base import METHODS, PruningMethod, TargetFn
from artemis.metrics.base import ImportanceMetric
from artemis.targets import PrunableTarget, find_targets

__all__ = ["UnstructuredMethod"]


@METHODS.register("magnitude_progressive")
class UnstructuredMethod(PruningMethod):
    """Unstructured (per-weight) pruning with any metric; see the module docstring."""

    name = "magnitude_progressive"

    def setup(self) -> None:
        cfg = self.config
        self.targets = find_targets(
            self.model,
            patterns=cfg.targets,
            exclude=cfg.exclude,
            block_prefixes=self.adapter.block_prefixes() if self.adapter.blocks is not None else None,
        )
        self.finals = {t.key: self.resolve_sparsity(t.name) for t in self.targets}
        for pattern in cfg.layer_sparsity:
            from artemis.targets import match_pattern

            if not any(match_pattern(pattern, t.name) for t in self.targets):
                from artemis.errors import ModelError

                raise ModelError(
                    f"pruning.layer_sparsity: pattern {pattern!r} matches none of the "
                    f"{len(self.targets)} prunable modules (for example {self.targets[0].name!r})"
                )

    def scope(self, metric: ImportanceMetric) -> str:
        return self.config.scope or metric.default_scope

    def _score_fn(self, target: PrunableTarget, metric: ImportanceMetric) -> Callable[[], Tensor]:
        old = self.manager.masks.get(target.key)

        def fn() -> Tensor:
            s = metric.score(target)
            if s.shape != target.param.shape:
                raise ValueError(
                    f"metric {metric.name!r} returned scores of shape {tuple(s.shape)} for "
                    f"{target.key} of shape {tuple(target.param.shape)}; scores must match the weight"
                )
            if old is not None:
                s = s * old  # pruned weights stay pruned
            return s

        return fn

    def compute_masks(self, target_fn: TargetFn, metric: ImportanceMetric) -> dict[str, Tensor]:
        scope = self.scope(metric)
        groups: "OrderedDict[float, list[PrunableTarget]]" = OrderedDict()
        for t in self.targets:
            final = self.finals[t.key]
            s = target_fn(self.config.final_sparsity if final is None else final)
            groups.setdefault(s, []).append(t)
        masks: dict[str, Tensor] = {}
        with torch.no_grad():
            for sparsity, targets in groups.items():
                if scope == "global":
                    fns = [self._score_fn(t, metric) for t in targets]
                    for t, m in zip(targets, global_masks(fns, [t.numel for t in targets], sparsity)):
                        masks[t.key] = m
                elif scope == "layer":
                    for t in targets:
                        masks[t.key] = layer_mask(self._score_fn(t, metric)(), sparsity)
                elif scope == "row":
                    for t in targets:
                        scores = self._score_fn(t, metric)()
                        if scores.dim() != 2:
                            raise ValueError(f"scope 'row' needs 2-D weights; {t.key} is {tuple(scores.shape)}")
                        masks[t.key] = t.rows_view(row_masks(t.rows_view(scores), sparsity)).contiguous()
                else:  # validated by the config; kept for custom configs
                    raise ValueError(f"unknown scope {scope!r}; valid: 'global', 'layer', 'row'")
        return masks
