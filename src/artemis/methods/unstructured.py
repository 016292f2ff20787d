"""``magnitude_progressive``: unstructured pruning of individual weights.

Each target weight gets a keep-mask from the configured metric's scores:

* ``scope: global`` — one threshold across every target of the same sparsity group
  (the targets sharing a final sparsity; ``layer_sparsity`` overrides form their own
  groups), found exactly without concatenating scores (:func:`artemis.core.masks.global_masks`);
* ``scope: layer`` — each weight matrix pruned to the target on its own;
* ``scope: row`` — each output row pruned to the target on its own (Wanda's choice);
* ``scope: owl`` — outlier-weighted layer-wise sparsity (:mod:`artemis.methods.owl`): each block
  gets its own sparsity from its share of activation outliers, exactly averaging to the
  target; inside a layer the metric's lowest scores are pruned;
* ``pattern: "N:M"`` — in every group of M consecutive input weights of a row the
  metric's N highest are kept (whatever the scope, which must be unset).

With ``reconstruction: sparsegpt`` (:class:`~artemis.methods.sparsegpt.SparseGPTOptions`)
the kept weights are then updated layer by layer on the calibration batches
(:meth:`UnstructuredMethod.reconstruct`, :func:`artemis.methods.sparsegpt.reconstruct_layers`).

Under FSDP2 each rank scores and masks its local shards; ``global`` and ``layer``
thresholds are found with collectives over the shards (only histograms travel), and
``row`` needs whole rows on each rank (dim-0 sharding of an ``(out, in)`` weight).

Fused Mixture-of-Experts weights (one 3-D target per ``gate_up_proj``/``down_proj``, see
:mod:`artemis.core.targets`) are pruned with every expert's matrix as a layer: ``scope:
layer`` prunes each expert matrix to the target, ``row`` each output row of each expert,
N:M groups run along each expert matrix's input dimension, and ``global`` ranks them with
everything else. ``scope: owl`` and ``reconstruction: sparsegpt`` do not support them yet
and raise :class:`~artemis.core.errors.ConfigError` at manager creation (exclude the
experts, or use another scope).

Weights pruned at an earlier event stay pruned (their scores are zeroed before the
next threshold is found), so masks only ever shrink during a run.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from typing import Any, Callable, Mapping, Optional

import torch
from torch import Tensor

from artemis.core.distributed import ShardLayout, local_tensor
from artemis.core.errors import CalibrationError, ConfigError, ModelError
from artemis.core.masks import count_to_prune, global_masks, layer_mask, nm_masks, row_masks
from artemis.core.targets import PrunableTarget, coverage_report, find_targets
from artemis.methods.base import METHODS, PruningMethod, TargetFn
from artemis.methods.owl import OWLOptions, allocate_counts, collect_input_norms, outlier_ratio, owl_sparsities
from artemis.methods.pipeline_options import OneShotOptions
from artemis.methods.sparsegpt import SparseGPTOptions, reconstruct_layers
from artemis.metrics.base import ImportanceMetric

__all__ = ["UnstructuredMethod", "rows_count_mask"]

logger = logging.getLogger(__name__)


def rows_count_mask(scores: Tensor, count: int) -> Tensor:
    """Keep-mask pruning exactly ``count`` weights of a 2-D ``(out, in)`` score matrix, spread
    over the rows as evenly as possible (the first ``count % out`` rows prune one more);
    inside a row the lowest scores go first (ties: lower column index).

    Example:
        >>> import torch
        >>> rows_count_mask(torch.tensor([[3.0, 1.0, 2.0], [1.0, 2.0, 3.0]]), 3).int().tolist()
        [[1, 0, 0], [0, 1, 1]]
    """
    rows, cols = scores.shape
    if not (0 <= count <= rows * cols):
        raise ValueError(f"cannot prune {count} of {rows * cols} weights")
    per_row = torch.full((rows, 1), count // rows, dtype=torch.int64, device=scores.device)
    per_row[: count % rows] += 1
    order = torch.sort(scores.detach().to(torch.float32), dim=1, stable=True).indices  # (out, in)
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(cols, device=scores.device).expand(rows, cols).contiguous())
    return rank >= per_row


@METHODS.register("magnitude_progressive")
class UnstructuredMethod(PruningMethod):
    """Unstructured (per-weight) pruning with any metric; see the module docstring."""

    name = "magnitude_progressive"
    supports_sharded_params = True
    supports_pattern = True
    options_models = (SparseGPTOptions, OWLOptions, OneShotOptions)

    def setup(self) -> None:
        cfg = self.config
        self.targets = find_targets(
            self.model,
            patterns=cfg.targets,
            exclude=cfg.exclude,
            block_prefixes=self.adapter.block_prefixes() if self.adapter.blocks is not None else None,
        )
        self.finals = {t.key: self._resolve(t) for t in self.targets}
        self.last_layer_sparsity: dict[str, float] = {}
        self.owl_ratios: dict[str, float] = {}
        self.last_reconstruction: Optional[dict[str, Any]] = None
        experts = [t.key for t in self.targets if t.experts]
        if experts and (cfg.scope == "owl" or cfg.reconstruction != "none"):
            option = "scope: owl" if cfg.scope == "owl" else f"reconstruction: {cfg.reconstruction}"
            raise ConfigError(
                f"{option} does not support fused Mixture-of-Experts weights yet ({len(experts)} targets, for "
                f"example {experts[0]!r}); exclude them (pruning.exclude: ['*.experts']) or use scope "
                "'global'/'layer'/'row' without reconstruction"
            )
        if self.adapter.blocks is not None and cfg.targets is None:
            for index, share, names in coverage_report(self.model, self.targets, self.adapter.block_prefixes()):
                shown = ", ".join(names[:6]) + (f" and {len(names) - 6} more" if len(names) > 6 else "")
                logger.warning(
                    "pruning targets leave out %.1f%% of the matrix parameters of block %d: %s "
                    "(excluded by pruning.exclude, routers, or not a prunable layer type); the summary's "
                    "sparsity counts only the targets",
                    100 * share,
                    index,
                    shown,
                )
        for pattern in cfg.layer_sparsity:
            if not any(t.matches(pattern) for t in self.targets):
                raise ModelError(
                    f"pruning.layer_sparsity: pattern {pattern!r} matches none of the "
                    f"{len(self.targets)} prunable modules (for example {self.targets[0].name!r})"
                )
        if cfg.nm_pattern is not None:  # N:M needs in_features divisible by M
            _, m = cfg.nm_pattern
            for t in self.targets:
                shape = tuple(t.rows_view(t.param).shape)
                if len(shape) != 2 or shape[1] % m:
                    raise ModelError(
                        f"pruning.pattern {cfg.pattern!r}: layer {t.name} has weight (out, in) = {shape}; "
                        f"its in_features must divide by {m}. Exclude it (pruning.exclude) or use another pattern"
                    )

    def _resolve(self, t: PrunableTarget) -> Optional[float]:
        """The ``layer_sparsity`` override of target ``t`` (its module name, or for fused
        experts its parameter key), if any (first match wins)."""
        for pattern, s in self.config.layer_sparsity.items():
            if t.matches(pattern):
                return s
        return None

    def one_shot_target_fn(self, sparsity: float) -> TargetFn:
        """As the base class; with an N:M pattern the sparsity must be k/M for k <= M-N."""
        if self.config.nm_pattern is not None:
            n, m = self.config.nm_pattern
            k = count_to_prune(m, sparsity)
            if k > m - n or abs(k / m - sparsity) > 1e-9:
                valid = ", ".join(f"{j / m:g}" for j in range(0, m - n + 1))
                raise ConfigError(
                    f"sparsity {sparsity!r} is not reachable with pattern {self.config.pattern!r}; "
                    f"prune k of every {m} weights: valid sparsities are {valid}"
                )
        return super().one_shot_target_fn(sparsity)

    def check_sharding(self, layout: ShardLayout, metric: ImportanceMetric) -> None:
        cfg = self.config
        sharded_experts = [t.key for t in self.targets if t.experts and layout.is_sharded(t.key)]
        if sharded_experts:
            raise ModelError(
                f"fused Mixture-of-Experts weights sharded by FSDP2 are not supported yet ({sharded_experts[0]}); "
                "exclude them (pruning.exclude: ['*.experts']) or prune on an unsharded model"
            )
        if any(layout.is_sharded(t.key) for t in self.targets) and (
            cfg.pattern is not None or cfg.reconstruction != "none" or cfg.scope == "owl"
        ):
            raise ModelError(
                "pattern, reconstruction and scope 'owl' are not supported on FSDP2-sharded weights yet "
                f"(got pattern={cfg.pattern!r}, reconstruction={cfg.reconstruction!r}, scope={cfg.scope!r}); "
                "prune one-shot on an unsharded model, or use scope 'global'/'layer' under FSDP2"
            )
        if self.scope(metric) != "row":
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

    def _score_fn(
        self, target: PrunableTarget, metric: ImportanceMetric, previous: Mapping[str, Tensor]
    ) -> Callable[[], Tensor]:
        def fn() -> Tensor:
            old = previous.get(target.key)  # read here: a packed mask is unpacked only while used
            s = local_tensor(metric.score(target))
            shape = local_tensor(target.param).shape
            if s.shape != shape:
                raise ValueError(
                    f"metric {metric.name!r} returned scores of shape {tuple(s.shape)} for "
                    f"{target.key} of shape {tuple(shape)}; scores must match the weight"
                )
            if torch.isnan(s).any():  # name the layer here: the mask code only sees anonymous scores
                w = local_tensor(target.param).detach()
                bad = int((~torch.isfinite(w)).sum())
                cause = f"its weight holds {bad} NaN or infinite values" if bad else f"metric {metric.name!r} gave NaN"
                raise ModelError(
                    f"importance scores of {target.key} contain NaN ({cause}); check the model's weights "
                    "(a diverged training step, a bad checkpoint) or exclude the layer with pruning.exclude"
                )
            if old is not None:
                s = s * old  # pruned weights stay pruned
            return s

        return fn

    def compute_masks(
        self,
        target_fn: TargetFn,
        metric: ImportanceMetric,
        *,
        previous: Mapping[str, Tensor],
        calibration: Optional[list] = None,
        sharding: Optional[ShardLayout] = None,
    ) -> dict[str, Tensor]:
        scope = self.scope(metric)
        if self.config.nm_pattern is not None:
            return self._nm_masks(target_fn(self.config.final_sparsity), metric, previous)
        if scope == "owl":
            one_shot = getattr(target_fn, "one_shot", False)
            return self._owl_masks(target_fn(self.config.final_sparsity), metric, previous, calibration, one_shot)
        groups: "OrderedDict[float, list[PrunableTarget]]" = OrderedDict()
        for t in self.targets:
            final = self.finals[t.key]
            s = target_fn(self.config.final_sparsity if final is None else final)
            groups.setdefault(s, []).append(t)
        masks: dict[str, Tensor] = {}
        layout = sharding
        with torch.no_grad():
            for sparsity, targets in groups.items():
                if scope == "global":
                    fns = [self._score_fn(t, metric, previous) for t in targets]
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
                            fn = self._score_fn(t, metric, previous)
                            masks[t.key] = global_masks([fn], [t.numel], sparsity, collective=layout.collective)[0]
                        elif t.experts:  # every expert matrix is a layer
                            scores = self._score_fn(t, metric, previous)()
                            masks[t.key] = torch.stack([layer_mask(scores[e], sparsity) for e in range(t.experts)])
                        else:
                            masks[t.key] = layer_mask(self._score_fn(t, metric, previous)(), sparsity)
                elif scope == "row":
                    for t in targets:
                        scores = self._score_fn(t, metric, previous)()
                        if scores.dim() != (3 if t.experts else 2):
                            raise ValueError(f"scope 'row' needs 2-D weights; {t.key} is {tuple(scores.shape)}")
                        masks[t.key] = t.from_rows(row_masks(t.rows_view(scores), sparsity)).contiguous()
                else:  # validated by the config; kept for custom configs
                    raise ValueError(f"unknown scope {scope!r}; valid: 'global', 'layer', 'row', 'owl'")
        return masks

    # ------------------------------------------------------------ N:M and OWL
    @torch.no_grad()
    def _nm_masks(self, sparsity: float, metric: ImportanceMetric, previous: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """N:M masks: prune ``round_half_up(sparsity·M)`` (at most M−N) of every group of M."""
        n, m = self.config.nm_pattern
        k = min(count_to_prune(m, sparsity), m - n)
        masks: dict[str, Tensor] = {}
        for t in self.targets:
            scores = self._score_fn(t, metric, previous)()
            if k == 0:
                masks[t.key] = torch.ones(scores.shape, dtype=torch.bool, device=scores.device)
                continue
            masks[t.key] = t.from_rows(nm_masks(t.rows_view(scores), m - k, m)).contiguous()
        self.last_layer_sparsity = {t.key: k / m for t in self.targets}
        return masks

    @torch.no_grad()
    def _owl_masks(
        self,
        sparsity: float,
        metric: ImportanceMetric,
        previous: Mapping[str, Tensor],
        calibration: Optional[list],
        one_shot: bool = False,
    ) -> dict[str, Tensor]:
        """OWL: per-block sparsities from outlier ratios (exact total count), then each
        layer's lowest metric scores pruned (spread evenly over its rows for metrics whose
        default scope is ``row``, as OWL does with Wanda). Weights pruned earlier stay pruned (in a
        progressive run a layer's count is at least its earlier count)."""
        if calibration is None:
            raise CalibrationError(
                "scope 'owl' needs calibration data for the activation outliers: pass "
                "apply_pruning(s, calibration_data=batches) or call manager.set_calibration_data(batches)"
            )
        norms = collect_input_norms(self.model, self.targets, calibration)
        units: "OrderedDict[object, list[PrunableTarget]]" = OrderedDict()
        for t in self.targets:
            units.setdefault(("block", t.block_index) if t.block_index is not None else ("layer", t.key), []).append(t)
        ratios, sizes = [], []
        for members in units.values():
            out = tot = 0
            for t in members:
                o, n = outlier_ratio(t.rows_view(t.param), norms[t.key], self.config.owl_m)
                out, tot = out + o, tot + n
            ratios.append(out / tot)
            sizes.append(tot)
        # λ at the final sparsity (a one-shot prune's own target); a progressive run's
        # earlier events scale λ in proportion, so the layer-wise shape grows with the
        # sparsity and a small early target is never pushed below 0
        final = sparsity if one_shot else self.config.final_sparsity
        lam = self.config.owl_lambda * (min(1.0, sparsity / final) if final > 0 else 1.0)
        unit_s = owl_sparsities(ratios, sizes, sparsity, lam)
        per_target = [(t, s) for members, s in zip(units.values(), unit_s) for t in members]
        total = count_to_prune(sum(t.numel for t, _ in per_target), sparsity)
        counts = allocate_counts([s for _, s in per_target], [t.numel for t, _ in per_target], total)
        masks: dict[str, Tensor] = {}
        self.last_layer_sparsity = {}
        for (t, _), c in zip(per_target, counts):
            old = previous.get(t.key)
            if old is not None:
                c = max(c, int((~old).sum()))
            scores = self._score_fn(t, metric, previous)()
            if metric.default_scope == "row" and scores.dim() == 2:  # Wanda-like metrics: per row
                masks[t.key] = t.from_rows(rows_count_mask(t.rows_view(scores), c)).contiguous()
            else:
                masks[t.key] = layer_mask(scores, c / t.numel)
            self.last_layer_sparsity[t.key] = c / t.numel
        self.owl_ratios = {str(u[1]): r for u, r in zip(units, ratios)}
        return masks

    def _event_pattern(self, masks: dict[str, Tensor]) -> "tuple[int, int] | None":
        """``(kept, M)`` per group at this event for an N:M pattern (None without one)."""
        if self.config.nm_pattern is None:
            return None
        _, m = self.config.nm_pattern
        k = round(self.last_layer_sparsity.get(next(iter(masks)), 0.0) * m) if masks else 0
        return (m - k, m) if k > 0 else None

    # ------------------------------------------------------------ reconstruction
    @torch.no_grad()
    def reconstruct(
        self, masks: dict[str, Tensor], *, previous: Mapping[str, Tensor], calibration: Optional[list] = None
    ) -> Optional[dict[str, Any]]:
        """With ``reconstruction: sparsegpt``: the OBS update of the kept weights of each
        target on the ``calibration`` batches (:func:`~artemis.methods.sparsegpt.reconstruct_layers`);
        with ``sparsegpt_mask: obs`` the pruned weights are chosen again, in ``masks``
        (the weights ``previous`` pruned stay pruned). Returns its report, or None."""
        cfg = self.config
        if cfg.reconstruction == "none":
            return None
        self.last_reconstruction = reconstruct_layers(
            self.model,
            self.targets,
            masks,
            calibration,
            blocksize=cfg.sparsegpt_blocksize,
            dampening=cfg.sparsegpt_dampening,
            select=cfg.sparsegpt_mask,
            priors=previous,
            pattern=self._event_pattern(masks),
            per_row=cfg.sparsegpt_obs_scope == "row",
            target=cfg.sparsegpt_target,
            bias_correction=cfg.sparsegpt_bias_correction,
            shrinkage=cfg.sparsegpt_shrinkage,
        )
        return self.last_reconstruction

    def summary(self) -> dict:
        out: dict = {}
        if self.config.pattern is not None:
            out["pattern"] = self.config.pattern
        if self.config.scope == "owl" and self.last_layer_sparsity:
            out["owl_layer_sparsity"] = dict(self.last_layer_sparsity)
            out["owl_outlier_ratios"] = dict(self.owl_ratios)
        if self.config.reconstruction != "none":
            out["reconstruction"] = self.config.reconstruction
            if self.last_reconstruction:
                out["last_reconstruction"] = dict(self.last_reconstruction)
        return out
