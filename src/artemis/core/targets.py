"""Prunable targets: which weight tensors of a model are pruned.

A :class:`PrunableTarget` names one weight (a module and its parameter). By default
the targets are every ``nn.Linear`` and Hugging Face ``Conv1D`` weight inside the
transformer blocks that the architecture adapter finds; embeddings, ``lm_head``,
norms and biases are never default targets. ``targets``/``exclude`` patterns select
other modules by name: ``fnmatch`` globs (``"*.mlp.*"``, ``"model.layers.0.*"``) or
regular expressions prefixed with ``re:`` (``"re:.*\\.(q|k)_proj$"``), matched against
the full module name.

Example:
    >>> import torch.nn as nn
    >>> from artemis.core.targets import find_targets
    >>> net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    >>> [t.key for t in find_targets(net, patterns=["*"])]
    ['0.weight', '2.weight']
"""

from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch.nn as nn

from artemis.core.errors import ModelError

__all__ = ["PrunableTarget", "find_targets", "match_pattern", "is_prunable_module", "conv1d_class"]


def conv1d_class() -> Optional[type]:
    """Hugging Face's ``Conv1D`` (GPT-2's transposed linear), or None without transformers."""
    try:
        from transformers.pytorch_utils import Conv1D
    except Exception:  # pragma: no cover - transformers is a dependency
        return None
    return Conv1D


def is_prunable_module(module: nn.Module) -> bool:
    """True for ``nn.Linear`` and HF ``Conv1D``: the layers whose weight Artemis prunes."""
    conv = conv1d_class()
    return isinstance(module, nn.Linear) or (conv is not None and isinstance(module, conv))


@dataclass(eq=False)
class PrunableTarget:
    """One prunable weight.

    Attributes:
        name: qualified module name (``model.layers.0.self_attn.q_proj``).
        module: the module holding the weight.
        param_name: the parameter's attribute name, ``weight``.
        transposed: True when the weight is stored ``(in, out)`` (HF ``Conv1D``), so an
            output row is a column of the tensor.
        block_index: index of the transformer block holding it, when known.
        tied_names: other module names sharing this same parameter.
    """

    name: str
    module: nn.Module
    param_name: str = "weight"
    transposed: bool = False
    block_index: Optional[int] = None
    tied_names: list[str] = field(default_factory=list)

    @property
    def key(self) -> str:
        """State-dict style key of the weight (``<module>.<param>``)."""
        return f"{self.name}.{self.param_name}" if self.name else self.param_name

    @property
    def param(self) -> nn.Parameter:
        return getattr(self.module, self.param_name)

    @property
    def numel(self) -> int:
        return self.param.numel()

    def rows_view(self, t):
        """``t`` (shaped like the weight) as ``(out_features, in_features)``."""
        return t.t() if self.transposed else t


def match_pattern(pattern: str, name: str) -> bool:
    """True when module ``name`` matches ``pattern`` (a glob, or a regex after ``re:``)."""
    if pattern.startswith("re:"):
        return re.fullmatch(pattern[3:], name) is not None
    return fnmatch.fnmatchcase(name, pattern)


def find_targets(
    model: nn.Module,
    *,
    patterns: Optional[Sequence[str]] = None,
    exclude: Sequence[str] = (),
    block_prefixes: Optional[Sequence[str]] = None,
) -> list[PrunableTarget]:
    """List the prunable weights of ``model`` in module order, each shared parameter once.

    Args:
        model: the model.
        patterns: module-name patterns; when given, every ``Linear``/``Conv1D`` whose name
            matches one is a target, and each pattern must match at least one module.
        exclude: patterns of modules never pruned.
        block_prefixes: module names of the transformer blocks (in order); when
            ``patterns`` is None, only modules inside these blocks are targets. When both
            are None, every ``Linear``/``Conv1D`` except the output embedding is a target.

    Raises:
        ModelError: a pattern matches no prunable module, or nothing is left to prune.
    """
    conv = conv1d_class()
    candidates: list[tuple[str, nn.Module]] = [
        (n, m) for n, m in model.named_modules(remove_duplicate=False) if is_prunable_module(m)
    ]
    output_emb = None
    get_out = getattr(model, "get_output_embeddings", None)
    if callable(get_out):
        try:
            output_emb = get_out()
        except Exception:
            output_emb = None
    embedding_params = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}

    def block_of(name: str) -> Optional[int]:
        if not block_prefixes:
            return None
        for i, prefix in enumerate(block_prefixes):
            if name == prefix or name.startswith(prefix + "."):
                return i
        return None

    selected: list[tuple[str, nn.Module]] = []
    if patterns is not None:
        for pattern in patterns:
            if not any(match_pattern(pattern, n) for n, _ in candidates):
                sample = ", ".join(n for n, _ in candidates[:6]) or "none"
                raise ModelError(
                    f"pruning.targets: pattern {pattern!r} matches no Linear/Conv1D module; "
                    f"module names look like: {sample}"
                )
        selected = [(n, m) for n, m in candidates if any(match_pattern(p, n) for p in patterns)]
    elif block_prefixes is not None:
        selected = [(n, m) for n, m in candidates if block_of(n) is not None]
    else:
        selected = [(n, m) for n, m in candidates if m is not output_emb and id(m.weight) not in embedding_params]
    for pattern in exclude:
        if not any(match_pattern(pattern, n) for n, _ in candidates):
            raise ModelError(f"pruning.exclude: pattern {pattern!r} matches no Linear/Conv1D module")
    selected = [(n, m) for n, m in selected if not any(match_pattern(p, n) for p in exclude)]

    by_param: dict[int, PrunableTarget] = {}
    targets: list[PrunableTarget] = []
    for name, module in selected:
        pid = id(module.weight)
        if pid in by_param:
            by_param[pid].tied_names.append(name)
            continue
        t = PrunableTarget(
            name=name,
            module=module,
            transposed=conv is not None and isinstance(module, conv),
            block_index=block_of(name),
        )
        by_param[pid] = t
        targets.append(t)
    if not targets:
        raise ModelError(
            f"{type(model).__name__} has no prunable weights: no nn.Linear or Conv1D module "
            + ("inside its transformer blocks" if block_prefixes is not None else "was selected")
            + "; set pruning.targets to the module names to prune"
        )
    return targets
