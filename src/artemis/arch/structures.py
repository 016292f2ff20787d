"""Prunable structures of a transformer block and the surgery that removes them.

This module is the per-architecture knowledge behind ``method: structured_sparsity``.
A :class:`StructureGroup` lists the *units* of one kind in one block — the key/value
head groups of its attention (a KV head together with the query heads that read it,
so grouped-query attention stays valid) or the intermediate neurons of its MLP — and,
for every projection touched by a unit, which output rows or input columns belong to
it (:class:`UnitSlice`). The method turns those slices into boolean weight masks; the
surgery here (:func:`shrink_module`, :meth:`StructureAdapter.shrink_attention`,
:meth:`StructureAdapter.shrink_mlp`) rebuilds the projections smaller and updates the
module attributes and the Hugging Face config.

Supported: ``llama`` (Llama, Mistral, Qwen2, Qwen3, Gemma), ``gpt2`` and ``bert``
(BERT, RoBERTa, XLM-R, sentence-transformers' MiniLM). Adding a family: register a
:class:`StructureAdapter` subclass under the name of its
:class:`~artemis.arch.base.ArchitectureAdapter`::

    from artemis.arch.structures import STRUCTURES, StructureAdapter

    @STRUCTURES.register("my_family")
    class MyStructures(StructureAdapter):
        model_types = ("my_family",)
        def attention(self, model, block, prefix, index): ...
        def mlp(self, model, block, prefix, index): ...
        def shrink_attention(self, model, block, group, keep): ...
        def update_config(self, config, widths): ...

Example:
    >>> import torch.nn as nn
    >>> lin = nn.Linear(4, 6)
    >>> small = shrink_module(lin, out_keep=[0, 2, 4], in_keep=None)
    >>> tuple(small.weight.shape), tuple(small.bias.shape)
    ((3, 4), (3,))
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Optional, Sequence

import torch
import torch.nn as nn

from artemis.core.errors import ModelError
from artemis.core.registry import Registry
from artemis.core.targets import conv1d_class

__all__ = [
    "UnitSlice",
    "StructureGroup",
    "StructureAdapter",
    "STRUCTURES",
    "LlamaStructures",
    "GPT2Structures",
    "BertStructures",
    "get_structure_adapter",
    "supported_structures",
    "shrink_module",
    "replace_module",
    "ATTENTION",
    "MLP",
]

ATTENTION = "attention"
MLP = "mlp"


@dataclass(eq=False)
class UnitSlice:
    """The part of one projection owned by the units of a group.

    Unit ``u`` owns indices ``offset + u*unit_size ... offset + (u+1)*unit_size - 1``
    along ``axis`` of ``module``: ``"out"`` (output features: weight rows of an
    ``nn.Linear``, columns of a ``Conv1D``, and the bias) or ``"in"`` (input features).
    """

    name: str
    module: nn.Module
    axis: str
    unit_size: int
    offset: int = 0

    @property
    def transposed(self) -> bool:
        conv = conv1d_class()
        return conv is not None and isinstance(self.module, conv)

    def out_in(self) -> tuple[int, int]:
        """``(out_features, in_features)`` of the module."""
        w = self.module.weight
        return (w.shape[1], w.shape[0]) if self.transposed else (w.shape[0], w.shape[1])

    def indices(self, unit: int) -> range:
        start = self.offset + unit * self.unit_size
        return range(start, start + self.unit_size)

    def params_per_unit(self) -> int:
        out_f, in_f = self.out_in()
        if self.axis == "out":
            has_bias = getattr(self.module, "bias", None) is not None
            return self.unit_size * (in_f + (1 if has_bias else 0))
        return self.unit_size * out_f


@dataclass(eq=False)
class StructureGroup:
    """The units of one kind (``attention`` or ``mlp``) in one block.

    Attributes:
        kind: ``"attention"`` (a unit is a KV head with its query heads) or ``"mlp"``
            (a unit is one intermediate neuron).
        block_index: index of the block.
        prefix: module name of the block.
        num_units: units in the block now.
        heads_per_unit: query heads per unit (attention; 1 for MLP neurons).
        head_dim: size of one head (attention; 1 for MLP).
        slices: the projection parts owned by the units.
    """

    kind: str
    block_index: int
    prefix: str
    num_units: int
    slices: list[UnitSlice]
    heads_per_unit: int = 1
    head_dim: int = 1
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def params_per_unit(self) -> int:
        return sum(s.params_per_unit() for s in self.slices)


def shrink_module(module: nn.Module, out_keep: Optional[Sequence[int]], in_keep: Optional[Sequence[int]]) -> nn.Module:
    """A new ``nn.Linear`` / ``Conv1D`` keeping only ``out_keep`` outputs and ``in_keep``
    inputs of ``module`` (``None`` keeps all), same dtype, device and ``requires_grad``.

    Args:
        module: an ``nn.Linear`` or Hugging Face ``Conv1D``.
        out_keep: sorted output-feature indices to keep, or None.
        in_keep: sorted input-feature indices to keep, or None.

    Returns:
        The new module (``module`` itself is not changed).

    Raises:
        ModelError: ``module`` is neither an ``nn.Linear`` nor a ``Conv1D``.
    """
    conv = conv1d_class()
    w = module.weight.detach()
    bias = getattr(module, "bias", None)
    b = bias.detach() if bias is not None else None
    with torch.no_grad():
        if isinstance(module, nn.Linear):
            if out_keep is not None:
                idx = torch.as_tensor(list(out_keep), dtype=torch.long, device=w.device)
                w = w.index_select(0, idx)
                b = b.index_select(0, idx) if b is not None else None
            if in_keep is not None:
                w = w.index_select(1, torch.as_tensor(list(in_keep), dtype=torch.long, device=w.device))
            new = nn.Linear(w.shape[1], w.shape[0], bias=b is not None, device="meta")
        elif conv is not None and isinstance(module, conv):
            if out_keep is not None:  # Conv1D weight is (in, out)
                idx = torch.as_tensor(list(out_keep), dtype=torch.long, device=w.device)
                w = w.index_select(1, idx)
                b = b.index_select(0, idx) if b is not None else None
            if in_keep is not None:
                w = w.index_select(0, torch.as_tensor(list(in_keep), dtype=torch.long, device=w.device))
            new = conv(w.shape[1], w.shape[0])
        else:
            raise ModelError(f"cannot shrink {type(module).__name__}: only nn.Linear and Conv1D are supported")
    new.weight = nn.Parameter(w.clone().contiguous(), requires_grad=module.weight.requires_grad)
    if b is not None:
        new.bias = nn.Parameter(b.clone().contiguous(), requires_grad=bias.requires_grad)
    elif isinstance(module, nn.Linear):
        new.bias = None
    new.train(module.training)
    return new


def replace_module(root: nn.Module, name: str, new: nn.Module) -> None:
    """Set the submodule ``name`` (dotted, relative to ``root``) to ``new``."""
    parent_name, _, attr = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, attr, new)


def _keep_ranges(num_units: int, keep_units: Sequence[int], s: UnitSlice, axis_len: int) -> list[int]:
    """Indices along ``s.axis`` kept when only ``keep_units`` stay (other indices stay too)."""
    drop: set[int] = set()
    keep_set = set(keep_units)
    for u in range(num_units):
        if u not in keep_set:
            drop.update(s.indices(u))
    return [i for i in range(axis_len) if i not in drop]


class StructureAdapter:
    """Per-family knowledge of attention heads and MLP neurons.

    Subclasses implement :meth:`attention`, :meth:`mlp`, :meth:`after_attention_shrink`
    (module attributes that hold head counts) and :meth:`update_config`. Registered in
    :data:`STRUCTURES` under the name of the matching architecture adapter.

    Class attributes:
        model_types: the ``config.model_type`` values this adapter is tested with.
        head_count_in_config: True when the HF config can express a smaller number of
            heads (a ``head_dim`` field); when False, models with pruned heads load with
            :func:`artemis.methods.structured.load_pruned_model`.
    """

    model_types: ClassVar[tuple[str, ...]] = ()
    head_count_in_config: ClassVar[bool] = True

    # ------------------------------------------------------------------ specs
    def attention(self, model: nn.Module, block: nn.Module, prefix: str, index: int) -> StructureGroup:
        raise NotImplementedError

    def mlp(self, model: nn.Module, block: nn.Module, prefix: str, index: int) -> StructureGroup:
        raise NotImplementedError

    def groups(
        self, model: nn.Module, blocks: nn.ModuleList, prefixes: Sequence[str], kinds: Sequence[str]
    ) -> list[StructureGroup]:
        """Every structure group of ``kinds`` in every block, block by block."""
        out: list[StructureGroup] = []
        for i, (block, prefix) in enumerate(zip(blocks, prefixes)):
            for kind in kinds:
                out.append(
                    self.attention(model, block, prefix, i) if kind == ATTENTION else self.mlp(model, block, prefix, i)
                )
        return out

    # ---------------------------------------------------------------- surgery
    def shrink(self, model: nn.Module, group: StructureGroup, keep_units: Sequence[int]) -> None:
        """Rebuild the projections of ``group`` keeping only ``keep_units`` (sorted)."""
        by_module: dict[str, dict[str, Any]] = {}
        for s in group.slices:
            entry = by_module.setdefault(s.name, {"module": s.module, "out": [], "in": []})
            entry[s.axis].append(s)
        for name, entry in by_module.items():
            module = entry["module"]
            out_f, in_f = UnitSlice(name, module, "out", 1).out_in()
            out_keep = in_keep = None
            if entry["out"]:
                keep = set(range(out_f))
                for s in entry["out"]:
                    keep &= set(_keep_ranges(group.num_units, keep_units, s, out_f))
                out_keep = sorted(keep)
            if entry["in"]:
                keep = set(range(in_f))
                for s in entry["in"]:
                    keep &= set(_keep_ranges(group.num_units, keep_units, s, in_f))
                in_keep = sorted(keep)
            new = shrink_module(module, out_keep, in_keep)
            replace_module(model, name, new)
        if group.kind == ATTENTION:
            self.after_attention_shrink(model, group, len(keep_units))
        else:
            self.after_mlp_shrink(model, group, len(keep_units))

    def after_attention_shrink(self, model: nn.Module, group: StructureGroup, kept_units: int) -> None:
        """Update attention-module attributes that hold head counts (default: none)."""

    def after_mlp_shrink(self, model: nn.Module, group: StructureGroup, kept_units: int) -> None:
        """Update MLP-module attributes that hold the width (default: none)."""

    def update_config(self, config: Any, widths: list[dict[str, int]]) -> bool:
        """Write the new widths into the HF ``config``; ``widths[i]`` has ``heads``,
        ``kv_heads``, ``head_dim`` and ``intermediate`` of block ``i`` (a key is absent
        when that kind was not pruned). Returns True when the config alone describes
        the model (plain ``from_pretrained`` loads it)."""
        raise NotImplementedError

    def _update_config_mlp_only(self, config: Any, widths: list[dict[str, int]], attr: str) -> bool:
        """``update_config`` of a family whose config can express only the MLP width
        (``attr``), not a smaller head count: plain loading works only without pruned heads."""
        plain = not any("heads" in w for w in widths)
        if any("intermediate" in w for w in widths):
            inter = self._uniform(widths, "intermediate")
            if inter is None:
                plain = False
                inter = max(w["intermediate"] for w in widths)
            setattr(config, attr, inter)
        return plain

    @staticmethod
    def _uniform(widths: list[dict[str, int]], key: str) -> Optional[int]:
        values = {w[key] for w in widths if key in w}
        return values.pop() if len(values) == 1 else None

    @staticmethod
    def _module(block: nn.Module, prefix: str, path: str, family: str, index: int) -> nn.Module:
        try:
            return block.get_submodule(path)
        except AttributeError:
            raise ModelError(
                f"block {index} ({prefix}) has no {path}; the {family!r} structured-sparsity adapter "
                f"expects {family}-style attention/MLP modules. Register a StructureAdapter in "
                "artemis.arch.structures.STRUCTURES for this architecture"
            ) from None


STRUCTURES: Registry[type[StructureAdapter]] = Registry("structured-sparsity architecture")


def _check_divides(what: str, total: int, part: int, where: str) -> int:
    if part <= 0 or total % part != 0:
        raise ModelError(f"{where}: {what} ({total}) is not a multiple of {part}; heads cannot be split evenly")
    return total // part


@STRUCTURES.register("llama")
class LlamaStructures(StructureAdapter):
    """Llama-shaped decoders: ``self_attn.{q,k,v,o}_proj`` (GQA), gated ``mlp.{gate,up,down}_proj``.

    A unit of attention is one KV head with its ``num_attention_heads //
    num_key_value_heads`` query heads (HF orders query heads so that head ``h`` reads KV
    head ``h // group``). The config gets ``num_attention_heads``,
    ``num_key_value_heads``, an explicit ``head_dim`` and ``intermediate_size``.
    """

    model_types = ("llama", "mistral", "qwen2", "qwen3", "gemma")

    def _head_dim(self, model: nn.Module, attn: nn.Module) -> int:
        hd = getattr(attn, "head_dim", None)
        if hd is None:
            cfg = model.config
            hd = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        return int(hd)

    def attention(self, model, block, prefix, index):
        attn = self._module(block, prefix, "self_attn", "llama", index)
        q = self._module(attn, prefix, "q_proj", "llama", index)
        k = self._module(attn, prefix, "k_proj", "llama", index)
        v = self._module(attn, prefix, "v_proj", "llama", index)
        o = self._module(attn, prefix, "o_proj", "llama", index)
        hd = self._head_dim(model, attn)
        where = f"block {index} ({prefix}.self_attn)"
        heads = _check_divides("q_proj output features", q.weight.shape[0], hd, where)
        kv = _check_divides("k_proj output features", k.weight.shape[0], hd, where)
        if v.weight.shape[0] != kv * hd or o.weight.shape[1] != heads * hd:
            raise ModelError(f"{where}: v_proj/o_proj shapes do not match {heads} heads and {kv} KV heads of size {hd}")
        group = _check_divides(f"number of query heads ({heads}) per KV head; query heads", heads, kv, where)
        p = f"{prefix}.self_attn"
        slices = [
            UnitSlice(f"{p}.q_proj", q, "out", group * hd),
            UnitSlice(f"{p}.k_proj", k, "out", hd),
            UnitSlice(f"{p}.v_proj", v, "out", hd),
            UnitSlice(f"{p}.o_proj", o, "in", group * hd),
        ]
        return StructureGroup(ATTENTION, index, prefix, kv, slices, heads_per_unit=group, head_dim=hd)

    def mlp(self, model, block, prefix, index):
        mlp = self._module(block, prefix, "mlp", "llama", index)
        gate = self._module(mlp, prefix, "gate_proj", "llama", index)
        up = self._module(mlp, prefix, "up_proj", "llama", index)
        down = self._module(mlp, prefix, "down_proj", "llama", index)
        n = gate.weight.shape[0]
        if up.weight.shape[0] != n or down.weight.shape[1] != n:
            raise ModelError(f"block {index} ({prefix}.mlp): gate/up/down widths differ")
        p = f"{prefix}.mlp"
        slices = [
            UnitSlice(f"{p}.gate_proj", gate, "out", 1),
            UnitSlice(f"{p}.up_proj", up, "out", 1),
            UnitSlice(f"{p}.down_proj", down, "in", 1),
        ]
        return StructureGroup(MLP, index, prefix, n, slices)

    def after_mlp_shrink(self, model, group, kept_units):
        mlp = model.get_submodule(f"{group.prefix}.mlp")
        if hasattr(mlp, "intermediate_size"):
            mlp.intermediate_size = kept_units

    def update_config(self, config, widths):
        plain = True
        heads = self._uniform(widths, "heads")
        if any("heads" in w for w in widths):
            if heads is None:
                plain = False
                config.num_attention_heads = max(w["heads"] for w in widths)
                config.num_key_value_heads = max(w["kv_heads"] for w in widths)
            else:
                config.num_attention_heads = heads
                config.num_key_value_heads = self._uniform(widths, "kv_heads")
            config.head_dim = widths[0]["head_dim"]
        if any("intermediate" in w for w in widths):
            inter = self._uniform(widths, "intermediate")
            if inter is None:
                plain = False
                inter = max(w["intermediate"] for w in widths)
            config.intermediate_size = inter
        return plain


@STRUCTURES.register("gpt2")
class GPT2Structures(StructureAdapter):
    """GPT-2: fused ``attn.c_attn`` Conv1D ``(hidden, 3·hidden)`` split into q|k|v,
    ``attn.c_proj``; MLP ``mlp.c_fc`` / ``mlp.c_proj``. GPT-2's config derives the head
    size from ``n_embd // n_head``, so a model with pruned heads is not describable by
    the config alone (see :func:`artemis.methods.structured.load_pruned_model`); pruned MLP
    neurons are (``n_inner``)."""

    model_types = ("gpt2",)
    head_count_in_config = False

    def attention(self, model, block, prefix, index):
        attn = self._module(block, prefix, "attn", "gpt2", index)
        c_attn = self._module(attn, prefix, "c_attn", "gpt2", index)
        c_proj = self._module(attn, prefix, "c_proj", "gpt2", index)
        if getattr(attn, "is_cross_attention", False):
            raise ModelError(f"block {index}: GPT-2 cross-attention is not supported by structured_sparsity")
        hd = int(attn.head_dim)
        split = int(attn.split_size)
        where = f"block {index} ({prefix}.attn)"
        heads = _check_divides("attention width (split_size)", split, hd, where)
        if c_attn.weight.shape[1] != 3 * split or c_proj.weight.shape[0] != split:
            raise ModelError(f"{where}: c_attn/c_proj shapes do not match {heads} heads of size {hd}")
        p = f"{prefix}.attn"
        slices = [UnitSlice(f"{p}.c_attn", c_attn, "out", hd, offset=o * split) for o in range(3)]
        slices.append(UnitSlice(f"{p}.c_proj", c_proj, "in", hd))
        return StructureGroup(ATTENTION, index, prefix, heads, slices, heads_per_unit=1, head_dim=hd)

    def after_attention_shrink(self, model, group, kept_units):
        attn = model.get_submodule(f"{group.prefix}.attn")
        attn.num_heads = kept_units
        attn.split_size = kept_units * group.head_dim

    def mlp(self, model, block, prefix, index):
        mlp = self._module(block, prefix, "mlp", "gpt2", index)
        fc = self._module(mlp, prefix, "c_fc", "gpt2", index)
        proj = self._module(mlp, prefix, "c_proj", "gpt2", index)
        n = fc.weight.shape[1]
        if proj.weight.shape[0] != n:
            raise ModelError(f"block {index} ({prefix}.mlp): c_fc/c_proj widths differ")
        p = f"{prefix}.mlp"
        slices = [UnitSlice(f"{p}.c_fc", fc, "out", 1), UnitSlice(f"{p}.c_proj", proj, "in", 1)]
        return StructureGroup(MLP, index, prefix, n, slices)

    def update_config(self, config, widths):
        return self._update_config_mlp_only(config, widths, "n_inner")


@STRUCTURES.register("bert")
class BertStructures(StructureAdapter):
    """BERT-family encoders: ``attention.self.{query,key,value}``,
    ``attention.output.dense``; MLP ``intermediate.dense`` / ``output.dense``. BERT's
    config derives the head size from ``hidden_size // num_attention_heads``, so a model
    with pruned heads loads with :func:`artemis.methods.structured.load_pruned_model`; pruned MLP
    neurons alone are described by ``intermediate_size``."""

    model_types = ("bert", "roberta", "xlm-roberta")
    head_count_in_config = False

    def attention(self, model, block, prefix, index):
        sa = self._module(block, prefix, "attention.self", "bert", index)
        out = self._module(block, prefix, "attention.output.dense", "bert", index)
        q = self._module(sa, prefix, "query", "bert", index)
        k = self._module(sa, prefix, "key", "bert", index)
        v = self._module(sa, prefix, "value", "bert", index)
        hd = int(sa.attention_head_size)
        where = f"block {index} ({prefix}.attention.self)"
        heads = _check_divides("query output features", q.weight.shape[0], hd, where)
        if k.weight.shape[0] != heads * hd or v.weight.shape[0] != heads * hd or out.weight.shape[1] != heads * hd:
            raise ModelError(f"{where}: key/value/output shapes do not match {heads} heads of size {hd}")
        p = f"{prefix}.attention"
        slices = [
            UnitSlice(f"{p}.self.query", q, "out", hd),
            UnitSlice(f"{p}.self.key", k, "out", hd),
            UnitSlice(f"{p}.self.value", v, "out", hd),
            UnitSlice(f"{p}.output.dense", out, "in", hd),
        ]
        return StructureGroup(ATTENTION, index, prefix, heads, slices, heads_per_unit=1, head_dim=hd)

    def after_attention_shrink(self, model, group, kept_units):
        sa = model.get_submodule(f"{group.prefix}.attention.self")
        sa.num_attention_heads = kept_units
        sa.all_head_size = kept_units * group.head_dim

    def mlp(self, model, block, prefix, index):
        fc = self._module(block, prefix, "intermediate.dense", "bert", index)
        proj = self._module(block, prefix, "output.dense", "bert", index)
        n = fc.weight.shape[0]
        if proj.weight.shape[1] != n:
            raise ModelError(f"block {index} ({prefix}): intermediate/output widths differ")
        slices = [
            UnitSlice(f"{prefix}.intermediate.dense", fc, "out", 1),
            UnitSlice(f"{prefix}.output.dense", proj, "in", 1),
        ]
        return StructureGroup(MLP, index, prefix, n, slices)

    def update_config(self, config, widths):
        return self._update_config_mlp_only(config, widths, "intermediate_size")


def supported_structures() -> str:
    """One line naming the supported architectures and their model types."""
    parts = []
    for name in STRUCTURES:
        parts.append(f"{name} ({', '.join(STRUCTURES.get(name).model_types)})")
    return "; ".join(parts)


def get_structure_adapter(arch_name: str, model: nn.Module) -> StructureAdapter:
    """The structure adapter for architecture adapter ``arch_name`` serving ``model``.

    Raises:
        ModelError: no structure adapter serves this architecture / model type.
    """
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if arch_name in STRUCTURES:
        cls = STRUCTURES.get(arch_name)
        if model_type is None or model_type in cls.model_types:
            return cls()
    raise ModelError(
        f"structured_sparsity does not support {type(model).__name__} (architecture "
        f"{arch_name!r}, model_type {model_type!r}): no recognised attention/MLP blocks. Supported: "
        f"{supported_structures()}. Add one by registering a StructureAdapter in "
        "artemis.arch.structures.STRUCTURES"
    )
