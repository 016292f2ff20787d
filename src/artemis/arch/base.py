"""Architecture adapters: the only place that knows a model family's attribute names.

An adapter answers "where are the transformer blocks?" for a model family and, for the
structural methods, how a block's attention heads, MLP neurons and the block itself
are removed. Everything else in Artemis asks the adapter; nothing hard-codes
``model.model.layers``.

Adding a family: subclass :class:`ArchitectureAdapter`, set ``model_types`` (the
``config.model_type`` values it serves) and ``block_paths`` (candidate dotted paths of
the ``nn.ModuleList`` of blocks, tried in order, also under any wrapper prefix), and
register it::

    from artemis.arch import ADAPTERS, ArchitectureAdapter

    @ADAPTERS.register("my_family")
    class MyAdapter(ArchitectureAdapter):
        model_types = ("my_family",)
        block_paths = ("backbone.blocks",)

Example:
    >>> from transformers import LlamaConfig, LlamaForCausalLM
    >>> from artemis.arch import get_adapter
    >>> cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
    ...                   num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
    >>> adapter = get_adapter(LlamaForCausalLM(cfg))
    >>> adapter.name, adapter.blocks_path
    ('llama', 'model.layers')
"""

from __future__ import annotations

from typing import ClassVar, Optional

import torch.nn as nn

from artemis.core.errors import ModelError
from artemis.core.registry import Registry

__all__ = ["ArchitectureAdapter", "GenericAdapter", "ADAPTERS", "get_adapter", "unwrap_model"]

ADAPTERS: Registry[type["ArchitectureAdapter"]] = Registry("architecture")


def unwrap_model(model: nn.Module) -> nn.Module:
    """The inner module of DDP/DataParallel/``torch.compile`` wrappers."""
    seen = 0
    while seen < 8:
        seen += 1
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif hasattr(model, "_orig_mod") and isinstance(model._orig_mod, nn.Module):
            model = model._orig_mod
        else:
            break
    return model


class ArchitectureAdapter:
    """Base adapter. Subclasses set ``model_types`` and ``block_paths``.

    After :meth:`bind`, ``blocks_path`` is the dotted name of the block list and
    ``blocks`` the list itself.
    """

    name: ClassVar[str] = "base"
    model_types: ClassVar[tuple[str, ...]] = ()
    block_paths: ClassVar[tuple[str, ...]] = ()
    #: how the family's MoE router turns logits into top-k weights (see
    #: :mod:`artemis.arch.moe`); None: expert removal is not supported
    moe_routing: ClassVar[Optional[str]] = None

    def __init__(self) -> None:
        self.model: Optional[nn.Module] = None
        self.blocks_path: Optional[str] = None
        self.blocks: Optional[nn.ModuleList] = None

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        """True when this adapter serves ``model`` (by ``config.model_type``)."""
        model_type = getattr(getattr(model, "config", None), "model_type", None)
        return model_type in cls.model_types

    def bind(self, model: nn.Module) -> "ArchitectureAdapter":
        """Locate the block list in ``model``; raise ModelError if it is not there."""
        self.model = model
        found = self._find_blocks(model)
        if found is None:
            raise ModelError(
                f"{type(model).__name__} (model_type {self._model_type(model)!r}) has no block list "
                f"at any of {', '.join(self.block_paths)}; the {self.name!r} adapter cannot use it"
            )
        self.blocks_path, self.blocks = found
        return self

    @staticmethod
    def _model_type(model: nn.Module) -> Optional[str]:
        return getattr(getattr(model, "config", None), "model_type", None)

    def _find_blocks(self, model: nn.Module) -> Optional[tuple[str, nn.ModuleList]]:
        modules = dict(model.named_modules())
        best: Optional[tuple[str, nn.ModuleList]] = None
        for path in self.block_paths:
            for name, module in modules.items():
                if not isinstance(module, nn.ModuleList):
                    continue
                if name == path or name.endswith("." + path):
                    if best is None or len(name) < len(best[0]):
                        best = (name, module)
            if best is not None:
                return best
        return None

    def block_prefixes(self) -> list[str]:
        """Module names of the blocks, in order (``model.layers.0``, ...)."""
        assert self.blocks_path is not None and self.blocks is not None, "call bind() first"
        return [f"{self.blocks_path}.{i}" for i in range(len(self.blocks))]

    @property
    def num_blocks(self) -> int:
        return len(self.blocks) if self.blocks is not None else 0


@ADAPTERS.register("generic")
class GenericAdapter(ArchitectureAdapter):
    """Fallback for any ``nn.Module``: the blocks are the longest ``nn.ModuleList`` whose
    children all share one class; a model without one has no blocks, and then every
    ``Linear``/``Conv1D`` except the output embedding is prunable."""

    name = "generic"

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        return True

    def bind(self, model: nn.Module) -> "ArchitectureAdapter":
        self.model = model
        best: Optional[tuple[str, nn.ModuleList]] = None
        for name, module in model.named_modules():
            if isinstance(module, nn.ModuleList) and len(module) > 0:
                kinds = {type(m) for m in module}
                if len(kinds) == 1 and any(True for _ in module[0].parameters()):
                    if best is None or len(module) > len(best[1]):
                        best = (name, module)
        if best is not None:
            self.blocks_path, self.blocks = best
        return self

    def block_prefixes(self) -> list[str]:
        if self.blocks is None:
            return []
        return super().block_prefixes()


def get_adapter(model: nn.Module, name: Optional[str] = None) -> ArchitectureAdapter:
    """The bound adapter for ``model``: ``name`` if given, else the first registered
    adapter whose ``matches`` is true (the generic one last)."""
    model = unwrap_model(model)
    if name is not None:
        return ADAPTERS.get(name)().bind(model)
    for adapter_name in ADAPTERS:
        cls = ADAPTERS.get(adapter_name)
        if cls is GenericAdapter:
            continue
        if cls.matches(model):
            return cls().bind(model)
    return GenericAdapter().bind(model)
