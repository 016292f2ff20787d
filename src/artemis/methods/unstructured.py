"""``magnitude_progressive``: unstructured pruning of individual weights.

Each target weight gets a keep-mask from the configured metric's scores:

* ``scope: global`` — one threshold across every target of the same sparsity group
  (the targets sharing a final sparsity; ``layer_sparsity`` overrides form their own
  groups), found exactly without concatenating scores (:func:`artemis.masks.global_masks`);
* ``scope: layer`` — each weight matrix pruned to the target on its own;
* ``scope: row`` — each output row pruned to the target on its own (Wanda's choice).

Under FSDP2 each rank scores and masks its local shards; ``global`` and ``layer``
thresholds are found with collectives over the shards (only histograms travel), and
``row`` needs whole rows on each rank (dim-0 sharding of an ``(out, in)`` weight).

Weights pruned at an earlier event stay pruned (their scores are zeroed before the
next threshold is found), so masks only ever shrink during a run.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Callable

import torch
from torch import Tensor

from artemis.distributed import local_tensor
from artemis.masks import global_masks, layer_mask, row_masks
from artemis.methods.base import METHODS, PruningMethod, TargetFn
from artemis.metrics.base import ImportanceMetric
from artemis.targets import PrunableTarget, find_targets

__all__ = ["UnstructuredMethod"]


@METHODS.register("magnitude_progressive")
class UnstructuredMethod(PruningMethod):
    """Unstructured (per-weight) pruning with any metric; see the module docstring."""

    name = "magnitude_progressive"
    supports_sharded_params = True

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

    def check_sharding(self, layout) -> None:
        from artemis.errors import ModelError

        if self.scope(self.manager.metric) != "row":
            return
        for t in self.targets:
            p = t.param
            if not layout.is_sharded(t.key):
                continue
            dim = p.placements[0].dim
            if t.transposed or dim != 0:
                raise ModelError(
                    f"scope 'row' needs whole output rows on each rank, but {t.key} is sharded along dim {dim}"
                    + (" of a transposed (in, out) Conv1D weight" if t.transposed else "")
                    + "; use scope 'global' or 'layer' under FSDP2"
                )

    def scope(self, metric: ImportanceMetric) -> str:
        return self.config.scope or metric.default_scope

    def _score_fn(self, target: PrunableTarget, metric: ImportanceMetric) -> Callable[[], Tensor]:
        old = self.manager.masks.get(target.key)

        def fn() -> Tensor:
            s = local_tensor(metric.score(target))
            shape = local_tensor(target.param).shape
            if s.shape != shape:
                raise ValueError(
                    f"metric {metric.name!r} returned scores of shape {tuple(s.shape)} for "
                    f"{target.key} of shape {tuple(shape)}; scores must match the weight"
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
        layout = self.manager.sharding
        with torch.no_grad():
            for sparsity, targets in groups.items():
                if scope == "global":
                    fns = [self._score_fn(t, metric) for t in targets]
                    numels = [t.numel for t in targets]
                    if layout is None:
                        ms = global_masks(fns, numels, sparsity)
                    else:
                        rep = [not layout.is_sharded(t.key) for t in targets]
                        ms = global_masks(fns, numels, sparsity, collective=layout.collective, replicated=rep)
                    for t, m in zip(targets, ms):
                        masks[t.key] = m
                elif scope == "layer":
                    for t in targets:
                        if layout is not None and layout.is_sharded(t.key):
                            fn = self._score_fn(t, metric)
                            masks[t.key] = global_masks([fn], [t.numel], sparsity, collective=layout.collective)[0]
                        else:
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
