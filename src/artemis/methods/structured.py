"""``structured_sparsity``: prune whole attention heads and MLP neurons, then remove them.

Units (see :mod:`artemis.arch.structures` for each architecture):

* **attention** — one key/value head together with the query heads that read it
  (grouped-query attention: ``num_attention_heads // num_key_value_heads`` query heads
  per KV head; for multi-head attention a unit is one head). A unit owns its rows of
  the q/k/v projections (and biases) and its columns of the output projection.
* **MLP** — one intermediate neuron: its row of the up projection (and of the gate
  projection of a gated MLP, with bias) and its column of the down projection.

``final_sparsity`` is the fraction of these structures' parameters that is removed.
How many units go, per event (pure, :func:`plan_unit_counts`): attention units are
coarse, so ``round(s · units)`` of them go; MLP neurons are fine, so their count makes
up the rest of the parameter budget ``s · P`` (``P`` = all parameters of the
structures). Counts never decrease during a run. A count that would remove every
attention unit (or every neuron) of a block is an error, raised before anything changes.

Scores: ``metric.score(target)`` of every weight a unit touches (magnitude, activation,
gradient sensitivity — any registered metric). Per coupled projection (each in-projection's
rows of the unit, the out-projection's columns of the unit) the scores make one number,
their ``structured_norm`` (``l2`` by default: ``sqrt(Σ s²)``; ``l1``: ``Σ|s|``), and the
``structured_reduction`` of those numbers (``sum``, ``mean``, ``max``, or ``output``: the
out-projection's columns only) is the unit's score (:func:`reduce_unit_scores`). The
default reduction follows the metric (:func:`default_reduction`): ``output`` for
``activation`` (the norm of what the unit writes over the calibration tokens), ``sum``
otherwise. Biases follow their rows and are not scored.

Widths (``structured_widths``):

* ``uniform`` (default): every block loses the same number of units of each kind,
  its lowest-scoring ones. The finalized model is a plain Hugging Face model where the
  config can express the widths (Llama family always; GPT-2/BERT when only MLP neurons
  were pruned — their configs derive the head size from ``hidden_size // heads``).
* ``per_layer``: units of one kind compete across blocks (each block keeps at least
  its best unit). The saved config carries ``artemis_structure`` and the model loads
  with :func:`load_pruned_model`.

Until ``finalize()`` a pruned unit is masked (its weights and biases are exactly zero,
so it contributes exactly zero and its gradients are zero; the manager keeps the
optimizer state zero too). ``finalize()`` rebuilds the projections as smaller
``nn.Linear``/``Conv1D`` layers and updates the module attributes and the HF config;
create a new optimizer afterwards (the old one holds the old parameters).

Example:
    >>> from transformers import LlamaConfig, LlamaForCausalLM
    >>> from artemis import create_pruning_manager
    >>> cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
    ...                   num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
    >>> model = LlamaForCausalLM(cfg)
    >>> mgr = create_pruning_manager({"pruning": {"method": "structured_sparsity"}}, model)
    >>> mgr.apply_pruning(0.5)
    >>> _ = mgr.finalize()
    >>> model.config.num_attention_heads, model.config.num_key_value_heads, model.config.intermediate_size
    (2, 1, 32)
"""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence, Union

import torch
import torch.nn as nn
from pydantic import Field, field_validator
from safetensors.torch import load_file
from torch import Tensor

from artemis.arch import get_adapter
from artemis.arch.structures import (
    ATTENTION,
    MLP,
    STRUCTURES,
    StructureAdapter,
    StructureGroup,
    get_structure_adapter,
    supported_structures,
)
from artemis.core.config import one_of
from artemis.core.distributed import ShardLayout
from artemis.core.errors import CheckpointError, ConfigError, ModelError
from artemis.core.targets import PrunableTarget
from artemis.methods.base import METHODS, MethodOptions, PruningMethod, TargetFn
from artemis.metrics.base import ImportanceMetric

__all__ = [
    "StructuredMethod",
    "StructuredOptions",
    "STRUCTURED_UNITS",
    "STRUCTURED_WIDTHS",
    "STRUCTURED_NORMS",
    "STRUCTURED_REDUCTIONS",
    "plan_unit_counts",
    "reduce_unit_scores",
    "default_reduction",
    "load_pruned_model",
    "STRUCTURE_FORMAT_VERSION",
]

logger = logging.getLogger(__name__)

STRUCTURE_FORMAT_VERSION = 1
_UNIT_KIND = {"attention_heads": ATTENTION, "mlp_neurons": MLP}
_KIND_WORD = {ATTENTION: "attention units (KV head groups)", MLP: "MLP neurons"}
STRUCTURED_UNITS = ("attention_heads", "mlp_neurons")
STRUCTURED_WIDTHS = ("uniform", "per_layer")
STRUCTURED_NORMS = ("l1", "l2")
STRUCTURED_REDUCTIONS = ("sum", "mean", "max", "output")


class StructuredOptions(MethodOptions):
    """The keys of the ``pruning:`` section that shape ``structured_sparsity``.

    Attributes:
        structured_units: which structures are pruned, any of ``attention_heads`` (KV
            head groups with their query heads) and ``mlp_neurons``; default both.
        structured_widths: ``uniform`` (default; every block keeps the same number of
            heads and neurons, so the saved model is a plain Hugging Face model) or
            ``per_layer`` (units ranked across blocks; load the result with
            :func:`load_pruned_model`).
        structured_norm: how the metric scores of a unit's weights in one coupled
            projection make one number: ``l2`` (default; Euclidean norm of the scores)
            or ``l1`` (sum of absolute scores).
        structured_reduction: how a unit's per-projection norms (its rows of the
            in-projections, its columns of the out-projection) make its score: ``sum``,
            ``mean`` or ``max`` over all of them, or ``output`` (the out-projection's
            columns only). ``None`` (default) picks the metric's: ``output`` for
            ``activation``, ``sum`` for the others (:func:`default_reduction`). Every
            unit of one kind has the same projections, so ``sum`` and ``mean`` rank
            units identically.

    Example:
        >>> StructuredOptions(structured_units=["mlp_neurons"]).structured_widths
        'uniform'
        >>> StructuredOptions().structured_norm, StructuredOptions().structured_reduction
        ('l2', None)
    """

    structured_units: list[str] = Field(default_factory=lambda: list(STRUCTURED_UNITS))
    structured_widths: str = "uniform"
    structured_norm: str = "l2"
    structured_reduction: Optional[str] = None

    @field_validator("structured_units")
    @classmethod
    def _check_structured_units(cls, v: list[str]) -> list[str]:
        if not v:
            raise ValueError(f"structured_units is empty; use one or both of {', '.join(map(repr, STRUCTURED_UNITS))}")
        for u in v:
            if u not in STRUCTURED_UNITS:
                one_of("structured unit", u, STRUCTURED_UNITS)
        if len(set(v)) != len(v):
            raise ValueError(f"structured_units lists a unit twice: {v!r}")
        return v

    @field_validator("structured_widths")
    @classmethod
    def _check_structured_widths(cls, v: str) -> str:
        return one_of("structured_widths", v, STRUCTURED_WIDTHS)

    @field_validator("structured_norm")
    @classmethod
    def _check_structured_norm(cls, v: str) -> str:
        return one_of("structured_norm", v, STRUCTURED_NORMS)

    @field_validator("structured_reduction")
    @classmethod
    def _check_structured_reduction(cls, v: Optional[str]) -> Optional[str]:
        return v if v is None else one_of("structured_reduction", v, STRUCTURED_REDUCTIONS)


def default_reduction(metric: str) -> str:
    """The ``structured_reduction`` used when none is given, for importance metric ``metric``.

    ``activation`` scores ``|W_ij|·‖X_j‖₂``; on the out-projection's columns of a unit
    their ``l2`` norm is the norm of what the unit writes to the residual stream over
    the calibration tokens (exactly, for an MLP neuron), so ``output`` ranks by that
    alone. Weight-only metrics (``magnitude``) rank best with every coupled weight
    (``sum``); see docs/benchmarks/structured.md for the measurements.

    Example:
        >>> default_reduction("activation"), default_reduction("magnitude")
        ('output', 'sum')
    """
    return "output" if metric == "activation" else "sum"


def reduce_unit_scores(
    rows: Sequence[Tensor], columns: Sequence[Tensor], norm: str = "l2", reduction: str = "sum"
) -> Tensor:
    """Unit scores from the metric scores of the weights each unit owns.

    Each coupled projection gives one number per unit, the ``norm`` of the unit's weight
    scores there (``l1``: ``Σ|s|``, ``l2``: ``sqrt(Σ s²)``); ``reduction`` combines a
    unit's numbers: ``sum``, ``mean`` or ``max`` over all its projections, or ``output``:
    the sum over the out-projection(s) only (the columns that read the unit's output).

    Args:
        rows: one tensor per in-projection (query/key/value, gate/up), shaped
            ``(units, weights per unit)``: the scores of the unit's rows there.
        columns: the same for the out-projection (output/down): the unit's columns.
        norm: ``l1`` or ``l2``.
        reduction: ``sum``, ``mean``, ``max`` or ``output``.

    Returns:
        ``(units,)`` float64 scores; lower means pruned first.

    Raises:
        ValueError: an unknown ``norm`` or ``reduction``, or no scores to reduce.

    Example:
        >>> import torch
        >>> up = torch.tensor([[3.0, 4.0], [1.0, 0.0]])  # unit 0: row (3, 4); unit 1: row (1, 0)
        >>> down = torch.tensor([[0.0, 2.0], [6.0, 8.0]])  # their columns of the out-projection
        >>> reduce_unit_scores([up], [down], "l2", "sum").tolist()
        [7.0, 11.0]
        >>> reduce_unit_scores([up], [down], "l1", "max").tolist()
        [7.0, 14.0]
        >>> reduce_unit_scores([up], [down], "l2", "output").tolist()
        [2.0, 10.0]
    """
    one_of("structured_norm", norm, STRUCTURED_NORMS)
    one_of("structured_reduction", reduction, STRUCTURED_REDUCTIONS)
    parts = [(False, p) for p in rows] + [(True, p) for p in columns]
    if not parts or (reduction == "output" and not columns):
        raise ValueError(f"reduce_unit_scores with reduction {reduction!r} got no scores to reduce")
    per, is_output = [], []
    for out, p in parts:
        p = p.detach().to(torch.float64)
        per.append(p.abs().sum(dim=1) if norm == "l1" else p.pow(2).sum(dim=1).sqrt())
        is_output.append(out)
    return _reduce(torch.stack(per), torch.tensor(is_output), reduction)


def _reduce(per: Tensor, is_output: Tensor, reduction: str) -> Tensor:
    """Reduce ``(projections, units)`` per-projection norms over the projections;
    ``is_output`` marks the out-projection(s)."""
    if reduction == "sum":
        return per.sum(dim=0)
    if reduction == "mean":
        return per.mean(dim=0)
    if reduction == "max":
        return per.max(dim=0).values
    return per[is_output].sum(dim=0)


def plan_unit_counts(
    sparsity: float,
    sizes: Sequence[tuple[int, int, int]],
    minimum: Optional[Sequence[int]] = None,
    names: Optional[Sequence[str]] = None,
) -> list[int]:
    """How many units of each kind to remove to prune ``sparsity`` of the parameters.

    Every kind but the last gets ``round(sparsity · units)`` (half up); the last kind
    (the finest, MLP neurons) makes up the rest of the budget ``sparsity · total``.

    Args:
        sparsity: fraction of the structures' parameters to remove, in [0, 1).
        sizes: per kind ``(units, params_per_unit, max_removable)``.
        minimum: per kind, units already removed (counts never decrease).
        names: per kind, a name for error messages.

    Returns:
        Units to remove per kind.

    Raises:
        ConfigError: a kind would lose more than ``max_removable`` units.

    Example:
        >>> plan_unit_counts(0.5, [(2, 100, 1), (10, 20, 9)])
        [1, 5]
        >>> plan_unit_counts(0.3, [(2, 100, 1), (10, 20, 9)])  # 1 head (100), then 20 of 120
        [1, 1]
    """
    names = list(names) if names is not None else [f"kind {i}" for i in range(len(sizes))]
    minimum = list(minimum) if minimum is not None else [0] * len(sizes)
    total = sum(n * p for n, p, _ in sizes)
    budget = sparsity * total
    counts: list[int] = []
    removed = 0
    for i, (n, p, max_removable) in enumerate(sizes):
        if i < len(sizes) - 1:
            k = int(math.floor(sparsity * n + 0.5))
        else:
            k = int(math.floor((budget - removed) / p + 0.5)) if p else 0
        k = max(k, minimum[i], 0)
        if k > max_removable:
            raise ConfigError(
                f"sparsity {sparsity:g} would remove {k} of {n} {names[i]}, leaving a block with none "
                f"(at most {max_removable} can go). Use a lower sparsity"
                + (", or prune only the other structures (pruning.structured_units)" if len(sizes) > 1 else "")
            )
        counts.append(k)
        removed += k * p
    return counts


@METHODS.register("structured_sparsity")
class StructuredMethod(PruningMethod):
    """Structured pruning of attention heads and MLP neurons; see the module docstring."""

    name = "structured_sparsity"
    structural = True
    options_models = (StructuredOptions,)

    # ------------------------------------------------------------------ setup
    def setup(self) -> None:
        cfg = self.config
        for key, value, default in (
            ("targets", cfg.targets, None),
            ("exclude", cfg.exclude, []),
            ("layer_sparsity", cfg.layer_sparsity, {}),
            ("scope", cfg.scope, None),
        ):
            if value != default:
                raise ConfigError(
                    f"pruning.{key} ({value!r}) is not supported by method 'structured_sparsity', which "
                    "prunes whole heads and neurons of every block; remove it (use structured_units / "
                    "structured_widths to shape structured pruning)"
                )
        if self.adapter.blocks is None or self.adapter.name not in STRUCTURES:
            raise ModelError(
                f"structured_sparsity found no recognised attention/MLP blocks in {type(self.model).__name__}. "
                f"Supported: {supported_structures()}. Add one by registering a StructureAdapter in "
                "artemis.arch.structures.STRUCTURES"
            )
        self.structures: StructureAdapter = get_structure_adapter(self.adapter.name, self.model)
        self.kinds = [_UNIT_KIND[u] for u in ("attention_heads", "mlp_neurons") if u in cfg.structured_units]
        self.uniform = cfg.structured_widths == "uniform"
        self.norm = cfg.structured_norm
        self.reduction = cfg.structured_reduction or default_reduction(cfg.importance_metric)
        self.groups: list[StructureGroup] = self.structures.groups(
            self.model, self.adapter.blocks, self.adapter.block_prefixes(), self.kinds
        )
        for kind in self.kinds:
            gs = self._of_kind(kind)
            if len({g.params_per_unit for g in gs}) != 1:
                raise ModelError(f"the {_KIND_WORD[kind]} of different blocks have different sizes; cannot rank them")
            if self.uniform and len({g.num_units for g in gs}) != 1:
                widths = [g.num_units for g in gs]
                raise ModelError(
                    f"blocks have different numbers of {_KIND_WORD[kind]} ({widths}); "
                    "structured_widths 'uniform' needs equal widths, use 'per_layer'"
                )
        # weight targets (scored by the metric) and every masked parameter (biases too)
        self.targets = []
        self._masked: dict[str, nn.Parameter] = {}
        seen: set[str] = set()
        for g in self.groups:
            for s in g.slices:
                if s.name in seen:
                    continue
                seen.add(s.name)
                t = PrunableTarget(name=s.name, module=s.module, transposed=s.transposed, block_index=g.block_index)
                self.targets.append(t)
                self._masked[t.key] = t.param
            for s in g.slices:
                bias = getattr(s.module, "bias", None)
                if s.axis == "out" and bias is not None:
                    self._masked[f"{s.name}.bias"] = bias
        self.params_before = self._count(self.model)
        self.block_params_before = sum(self._count(b) for b in self.adapter.blocks)
        self.structure_params = sum(g.num_units * g.params_per_unit for g in self.groups)
        self._finalized = False
        self._final_widths: Optional[list[dict[str, int]]] = None
        self._plain: Optional[bool] = None
        self._removed_params = 0
        self.plan(cfg.final_sparsity)  # fail now, before anything changes, if the target is impossible

    @staticmethod
    def _count(module: nn.Module) -> int:
        return sum(p.numel() for p in module.parameters())

    def _of_kind(self, kind: str) -> list[StructureGroup]:
        return [g for g in self.groups if g.kind == kind]

    def masked_params(self) -> dict[str, nn.Parameter]:
        return dict(self._masked)

    # -------------------------------------------------------------- planning
    def plan(self, sparsity: float, pruned: Optional[list[set[int]]] = None) -> dict[str, int]:
        """Units to remove per kind: per block (``uniform``) or in total (``per_layer``).

        Raises:
            ConfigError: the sparsity would remove every unit of a kind in a block.
        """
        sizes, minimum, names = [], [], []
        for kind in self.kinds:
            gs = self._of_kind(kind)
            p = gs[0].params_per_unit
            if self.uniform:
                n = gs[0].num_units
                sizes.append((n, p * len(gs), n - 1))
                done = 0 if pruned is None else max(len(pruned[self.groups.index(g)]) for g in gs)
            else:
                n = sum(g.num_units for g in gs)
                sizes.append((n, p, n - len(gs)))
                done = 0 if pruned is None else sum(len(pruned[self.groups.index(g)]) for g in gs)
            minimum.append(done)
            names.append(_KIND_WORD[kind] + (" of every block" if self.uniform else " in total"))
        counts = plan_unit_counts(sparsity, sizes, minimum, names)
        return dict(zip(self.kinds, counts))

    # ---------------------------------------------------------------- masking
    def _pruned_units(self, masks: Optional[Mapping[str, Tensor]] = None) -> list[set[int]]:
        """Units already pruned, read from ``masks`` (default: the manager's current masks;
        unit pruned ⇔ its first index of its first slice is masked)."""
        out: list[set[int]] = []
        masks = self.manager.masks if masks is None else masks
        for g in self.groups:
            s = g.slices[0]
            mask = masks.get(f"{s.name}.weight")
            pruned: set[int] = set()
            if mask is not None:
                rows = mask.t() if s.transposed else mask  # (out, in)
                line = rows.any(dim=1) if s.axis == "out" else rows.any(dim=0)
                for u in range(g.num_units):
                    if not bool(line[s.indices(u).start]):
                        pruned.add(u)
            out.append(pruned)
        return out

    @torch.no_grad()
    def unit_scores(self, metric: ImportanceMetric, groups: Optional[Sequence[StructureGroup]] = None) -> list[Tensor]:
        """Score of every unit of every group (float64): per coupled projection the
        ``structured_norm`` of the unit's weight scores, combined by ``structured_reduction``
        (the same numbers as :func:`reduce_unit_scores`, without copying the weights).
        ``groups``: only those (default: all), in that order (the one-shot pipeline scores
        one block's groups while it is loaded)."""
        norm, reduction = self.norm, self.reduction
        cache: dict[str, Tensor] = {}
        lines: dict[tuple[str, str], Tensor] = {}
        by_name = {t.name: t for t in self.targets}
        out: list[Tensor] = []
        for g in self.groups if groups is None else groups:
            per = torch.zeros(len(g.slices), g.num_units, dtype=torch.float64)
            for j, s in enumerate(g.slices):
                if (s.name, s.axis) not in lines:
                    if s.name not in cache:
                        t = by_name[s.name]
                        scores = metric.score(t)
                        if scores.shape != t.param.shape:
                            raise ValueError(
                                f"metric {metric.name!r} returned scores of shape {tuple(scores.shape)} for "
                                f"{t.key} of shape {tuple(t.param.shape)}; scores must match the weight"
                            )
                        cache[s.name] = t.rows_view(scores.detach())  # (out, in)
                    rows = cache[s.name].abs() if norm == "l1" else cache[s.name].pow(2)
                    lines[(s.name, s.axis)] = rows.sum(dim=1 if s.axis == "out" else 0, dtype=torch.float64).cpu()
                line = lines[(s.name, s.axis)]
                seg = line[s.offset : s.offset + g.num_units * s.unit_size]
                per[j] = seg.view(g.num_units, s.unit_size).sum(dim=1)
            if norm == "l2":
                per = per.sqrt()
            out.append(_reduce(per, torch.tensor([s.axis == "in" for s in g.slices]), reduction))
        return out

    def compute_masks(
        self,
        target_fn: TargetFn,
        metric: ImportanceMetric,
        *,
        previous: Mapping[str, Tensor],
        calibration: Optional[list] = None,
        sharding: Optional[ShardLayout] = None,
    ) -> dict[str, Tensor]:
        sparsity = target_fn(self.config.final_sparsity)
        pruned = self._pruned_units(previous)
        counts = self.plan(sparsity, pruned)  # raises before anything changes
        scores = self.unit_scores(metric)
        return self._build_masks(self.choose(counts, scores, pruned))

    def choose(self, counts: Mapping[str, int], scores: Sequence[Tensor], pruned: Sequence[set[int]]) -> list[set[int]]:
        """The units of every group pruned after this event (those in ``pruned`` stay),
        from :meth:`plan`'s ``counts`` and :meth:`unit_scores`' ``scores``: per block the
        lowest-scoring ones (``uniform``), or ranked across blocks with each block keeping
        its best unit (``per_layer``). Lowest first, ties to the lower index."""
        chosen: list[set[int]] = [set() for _ in self.groups]
        for kind in self.kinds:
            idx = [i for i, g in enumerate(self.groups) if g.kind == kind]
            k = counts[kind]
            if self.uniform:
                for i in idx:
                    chosen[i] = self._lowest(scores[i], pruned[i], k)
            else:
                flat, owner = [], []
                for i in idx:
                    sc = scores[i].clone()
                    alive = [u for u in range(len(sc)) if u not in pruned[i]]
                    sc[list(pruned[i])] = -math.inf
                    best = max(alive, key=lambda u: (float(sc[u]), -u))
                    sc[best] = math.inf  # every block keeps at least its best unit
                    flat.append(sc)
                    owner += [(i, u) for u in range(len(sc))]
                order = torch.sort(torch.cat(flat), stable=True).indices[:k].tolist()
                for j in order:
                    i, u = owner[j]
                    chosen[i].add(u)
        return chosen

    @staticmethod
    def _lowest(scores: Tensor, pruned: set[int], k: int) -> set[int]:
        sc = scores.clone()
        if pruned:
            sc[list(pruned)] = -math.inf
        return set(torch.sort(sc, stable=True).indices[:k].tolist())

    def _build_masks(self, chosen: list[set[int]]) -> dict[str, Tensor]:
        masks = {key: torch.ones_like(p, dtype=torch.bool) for key, p in self._masked.items()}
        for g, units in zip(self.groups, chosen):
            if not units:
                continue
            for s in g.slices:
                w = masks[f"{s.name}.weight"]
                rows = w.t() if s.transposed else w  # a view: (out, in)
                bias = masks.get(f"{s.name}.bias") if s.axis == "out" else None
                starts = torch.tensor(sorted(units), dtype=torch.long) * s.unit_size + s.offset
                idx = (starts.unsqueeze(1) + torch.arange(s.unit_size)).flatten().to(w.device)
                if s.axis == "out":
                    rows[idx, :] = False
                    if bias is not None:
                        bias[idx] = False
                else:
                    rows[:, idx] = False
        return masks

    # -------------------------------------------------------------- finalize
    def _widths(self, pruned: list[set[int]]) -> list[dict[str, int]]:
        widths: list[dict[str, int]] = [{} for _ in range(self.adapter.num_blocks)]
        for g, p in zip(self.groups, pruned):
            kept = g.num_units - len(p)
            w = widths[g.block_index]
            if g.kind == ATTENTION:
                w["heads"] = kept * g.heads_per_unit
                w["kv_heads"] = kept
                w["head_dim"] = g.head_dim
            else:
                w["intermediate"] = kept
        return widths

    def finalize(self) -> None:
        pruned = self._pruned_units()
        before = self._count(self.model)
        for g, p in zip(self.groups, pruned):
            keep = [u for u in range(g.num_units) if u not in p]
            self.structures.shrink(self.model, g, keep)
        self.finish_removal(pruned, before)

    def finish_removal(self, pruned: Sequence[set[int]], before: int) -> None:
        """After every group was shrunk to its units not in ``pruned`` (``before``: the
        parameter count before): the config's widths (or ``artemis_structure``), the
        removed count and the targets on the new modules. Part of :meth:`finalize`; the
        one-shot pipeline shrinks block by block and then calls it."""
        widths = self._widths(list(pruned))
        config = getattr(self.model, "config", None)
        plain = True
        if config is not None:
            plain = self.structures.update_config(config, widths)
            if not plain:
                config.artemis_structure = {"format_version": STRUCTURE_FORMAT_VERSION, "layers": widths}
                logger.warning(
                    "the pruned model's widths cannot be written in its %s config alone; load it with "
                    "artemis.methods.structured.load_pruned_model(path, <AutoModel class>)",
                    type(config).__name__,
                )
        self._removed_params = before - self._count(self.model)
        self._final_widths = widths
        self._plain = plain
        self._finalized = True
        self.targets = [
            PrunableTarget(
                name=t.name, module=self.model.get_submodule(t.name), transposed=t.transposed, block_index=t.block_index
            )
            for t in self.targets
        ]

    # --------------------------------------------------------------- summary
    def parameter_counts(self) -> Optional[tuple[int, int]]:
        """``(pruned, prunable)`` parameters of the structures (biases included)."""
        if self._finalized:
            return self._removed_params, self.structure_params
        pruned = self._pruned_units()
        removed = sum(len(p) * g.params_per_unit for g, p in zip(self.groups, pruned))
        return removed, self.structure_params

    def summary(self) -> dict[str, Any]:
        pruned = None if self._finalized else self._pruned_units()
        widths = self._final_widths if self._finalized else self._widths(pruned)
        layers = []
        totals = {g.block_index: {} for g in self.groups}
        for g in self.groups:
            totals[g.block_index][g.kind] = g
        for i, w in enumerate(widths):
            row: dict[str, Any] = {"block": i}
            ga = totals.get(i, {}).get(ATTENTION)
            if ga is not None:
                row["heads_kept"] = w["heads"]
                row["heads_total"] = ga.num_units * ga.heads_per_unit
                row["kv_heads_kept"] = w["kv_heads"]
                row["kv_heads_total"] = ga.num_units
            gm = totals.get(i, {}).get(MLP)
            if gm is not None:
                row["neurons_kept"] = w["intermediate"]
                row["neurons_total"] = gm.num_units
            layers.append(row)
        removed, prunable = self.parameter_counts()
        if self._finalized:
            after = self._count(self.model)
            block_after = sum(self._count(b) for b in self.adapter.blocks)
        else:
            after = self.params_before - removed
            block_after = self.block_params_before - removed
        return {
            "structured": {
                "units": list(self.config.structured_units),
                "widths": self.config.structured_widths,
                "scores": {"norm": self.norm, "reduction": self.reduction},
                "physically_removed": self._finalized,
                "layers": layers,
                "structure_parameters": prunable,
                "structure_parameters_removed": removed,
                "parameters_before": self.params_before,
                "parameters_after": after,
                "block_parameters_before": self.block_params_before,
                "block_parameters_after": block_after,
                "loads_with_from_pretrained": self._plain if self._finalized else None,
            }
        }


def _read_state_dict(path: Path) -> dict[str, Tensor]:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    elif (path / "model.safetensors").is_file():
        files = ["model.safetensors"]
    else:
        raise CheckpointError(f"{str(path)!r} holds no model.safetensors (or index); save with save_pretrained()")
    state: dict[str, Tensor] = {}
    for f in files:
        state.update(load_file(str(path / f)))
    return state


def load_pruned_model(path: Union[str, os.PathLike], model_class: Any = None, **kwargs: Any) -> nn.Module:
    """Load a model saved after ``structured_sparsity`` (any widths).

    When the config holds no ``artemis_structure`` (uniform widths the config can
    express) this is just ``model_class.from_pretrained(path, **kwargs)``. Otherwise the
    model is built from its config, each block is shrunk to its recorded widths, and
    the saved weights are loaded strictly (no missing or unexpected keys).

    Args:
        path: the folder written by ``save_pretrained``.
        model_class: a Hugging Face Auto class or model class (default ``AutoModel``;
            use ``AutoModelForCausalLM`` for causal LMs).
        **kwargs: passed to ``from_pretrained`` in the plain case.

    Raises:
        CheckpointError: the folder has no weights, an unknown structure format, or the
            weights do not match the recorded widths.
    """
    from transformers import AutoConfig, AutoModel  # here: importing transformers takes seconds

    model_class = model_class or AutoModel
    path = Path(path)
    config = AutoConfig.from_pretrained(str(path))
    info = getattr(config, "artemis_structure", None)
    if info is None:
        return model_class.from_pretrained(str(path), **kwargs)
    if not isinstance(info, dict) or info.get("format_version") != STRUCTURE_FORMAT_VERSION:
        raise CheckpointError(
            f"{str(path)!r}: artemis_structure has format_version {info.get('format_version') if isinstance(info, dict) else info!r}; "
            f"this Artemis reads version {STRUCTURE_FORMAT_VERSION}"
        )
    state = _read_state_dict(path)
    model = model_class.from_config(config)
    adapter = get_adapter(model)
    structures = get_structure_adapter(adapter.name, model)
    widths = info["layers"]
    if len(widths) != adapter.num_blocks:
        raise CheckpointError(
            f"{str(path)!r}: artemis_structure lists {len(widths)} blocks, the model has {adapter.num_blocks}"
        )
    for i, (block, prefix) in enumerate(zip(adapter.blocks, adapter.block_prefixes())):
        w = widths[i]
        if "kv_heads" in w:
            g = structures.attention(model, block, prefix, i)
            structures.shrink(model, g, list(range(int(w["kv_heads"]))))
        if "intermediate" in w:
            g = structures.mlp(model, block, prefix, i)
            structures.shrink(model, g, list(range(int(w["intermediate"]))))
    floats = [t for t in state.values() if t.is_floating_point()]
    if floats:
        model.to(floats[0].dtype)
    missing, unexpected = model.load_state_dict(state, strict=False)
    params = dict(model.named_parameters(remove_duplicate=False))
    loaded_ids = {id(params[k]) for k in state if k in params}
    missing = [k for k in missing if not (k in params and id(params[k]) in loaded_ids)]  # tied copies are fine
    if missing or unexpected:
        raise CheckpointError(
            f"{str(path)!r}: weights do not match the recorded structure: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    model.eval()
    return model
