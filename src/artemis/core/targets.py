"""Prunable targets: which weight tensors of a model are pruned.

A :class:`PrunableTarget` names one weight (a module and its parameter). By default
the targets are every ``nn.Linear`` and Hugging Face ``Conv1D`` weight inside the
transformer blocks that the architecture adapter finds, and the fused 3-D expert
weights of Mixture-of-Experts layers (transformers 5's ``MixtralExperts``-style modules:
``gate_up_proj`` ``(experts, 2·inter, hidden)``, ``down_proj`` ``(experts, hidden, inter)``);
embeddings, ``lm_head``, norms, biases and MoE routers (``mlp.gate``,
``shared_expert_gate``) are never default targets. ``targets``/``exclude`` patterns
select other modules by name: ``fnmatch`` globs (``"*.mlp.*"``, ``"model.layers.0.*"``)
or regular expressions prefixed with ``re:`` (``"re:.*\\.(q|k)_proj$"``), matched against
the full module name (for a fused-experts weight also against its parameter key,
``model.layers.0.mlp.experts.down_proj``). A router is a target only when a ``targets``
pattern names it.

A fused-experts weight is one target whose every expert matrix is "a layer": its
:meth:`PrunableTarget.matrices` view is ``(experts, out, in)`` and :meth:`PrunableTarget.rows_view`
``(experts·out, in)``. A module inside a block with 3-D (or higher) parameters that is
neither a torch convolution nor a recognised fused-experts module is an unknown layout:
selecting it raises :class:`~artemis.core.errors.ModelError` naming it, never a silent skip.

Example:
    >>> import torch.nn as nn
    >>> from artemis.core.targets import find_targets
    >>> net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    >>> [t.key for t in find_targets(net, patterns=["*"])]
    ['0.weight', '2.weight']
"""

from __future__ import annotations

import fnmatch
import logging
import re
from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch.nn as nn

from artemis.core.errors import ModelError

__all__ = [
    "PrunableTarget",
    "find_targets",
    "match_pattern",
    "is_prunable_module",
    "conv1d_class",
    "fused_expert_params",
    "is_router",
    "unknown_layout_params",
    "coverage_report",
]

logger = logging.getLogger(__name__)

#: share of a block's matrix parameters left out of the targets above which a warning is logged
COVERAGE_WARN_SHARE = 0.05

_CONV_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)


def conv1d_class() -> Optional[type]:
    """Hugging Face's ``Conv1D`` (GPT-2's transposed linear), or None without transformers."""
    try:
        from transformers.pytorch_utils import Conv1D  # here: importing transformers takes seconds
    except Exception:  # pragma: no cover - transformers is a dependency
        return None
    return Conv1D


def is_prunable_module(module: nn.Module) -> bool:
    """True for ``nn.Linear`` and HF ``Conv1D``: the layers whose weight Artemis prunes."""
    conv = conv1d_class()
    return isinstance(module, nn.Linear) or (conv is not None and isinstance(module, conv))


def fused_expert_params(module: nn.Module) -> list[str]:
    """Names of the fused expert weights of ``module``: its own 3-D parameters whose first
    dimension is ``module.num_experts`` (transformers 5's ``@use_experts_implementation``
    experts: ``gate_up_proj``/``up_proj``/``down_proj``); ``[]`` for any other module.

    Example:
        >>> import torch, torch.nn as nn
        >>> m = nn.Module(); m.num_experts = 4
        >>> m.down_proj = nn.Parameter(torch.zeros(4, 8, 16)); m.bias = nn.Parameter(torch.zeros(4, 8))
        >>> fused_expert_params(m)
        ['down_proj']
    """
    n = getattr(module, "num_experts", None)
    if isinstance(module, _CONV_TYPES) or not isinstance(n, int) or isinstance(n, bool) or n < 1:
        return []
    return [pn for pn, p in module.named_parameters(recurse=False) if p.dim() == 3 and p.shape[0] == n]


def is_router(module: nn.Module) -> bool:
    """True for an MoE router: a module (not a ``Linear``) with attributes ``num_experts``
    and ``top_k`` and a 2-D ``weight`` of ``num_experts`` rows (transformers 5's
    ``*TopKRouter``)."""
    w = getattr(module, "weight", None)
    n = getattr(module, "num_experts", None)
    return (
        isinstance(w, nn.Parameter)
        and w.dim() == 2
        and isinstance(n, int)
        and w.shape[0] == n
        and hasattr(module, "top_k")
        and not is_prunable_module(module)
    )


def _is_gate_linear(name: str, module: nn.Module) -> bool:
    """A ``Linear`` that gates a shared expert (Qwen2-MoE's ``shared_expert_gate``)."""
    return name.rsplit(".", 1)[-1] == "shared_expert_gate"


def unknown_layout_params(module: nn.Module) -> list[tuple[str, tuple[int, ...]]]:
    """``(name, shape)`` of ``module``'s own parameters of 3 or more dimensions that no
    known layout explains (not a torch convolution, not fused experts)."""
    if isinstance(module, _CONV_TYPES):
        return []
    known = set(fused_expert_params(module))
    return [
        (pn, tuple(p.shape)) for pn, p in module.named_parameters(recurse=False) if p.dim() >= 3 and pn not in known
    ]


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
        experts: for a fused-experts weight, the number of expert matrices stacked along
            dim 0 (``(experts, out, in)``, or ``(experts, in, out)`` when ``transposed``);
            0 for a plain 2-D weight.
        kind: ``"linear"`` (``Linear``/``Conv1D``), ``"experts"`` or ``"router"``.
    """

    name: str
    module: nn.Module
    param_name: str = "weight"
    transposed: bool = False
    block_index: Optional[int] = None
    tied_names: list[str] = field(default_factory=list)
    experts: int = 0
    kind: str = "linear"

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

    @property
    def in_features(self) -> int:
        """Input features of the weight (of each expert matrix for fused experts)."""
        shape = self.param.shape
        return int(shape[-2] if self.transposed else shape[-1])

    def matrices(self, t):
        """``t`` (shaped like a fused-experts weight) as ``(experts, out, in)``."""
        return t.transpose(-1, -2) if self.transposed else t

    def rows_view(self, t):
        """``t`` (shaped like the weight) as ``(out_features, in_features)``; for fused
        experts ``(experts·out, in)`` (a copy when the weight is stored transposed).
        :meth:`from_rows` is its inverse."""
        if self.experts:
            m = self.matrices(t)
            return m.reshape(-1, m.shape[-1])
        return t.t() if self.transposed else t

    def from_rows(self, r):
        """Inverse of :meth:`rows_view`: ``(out, in)`` rows back to the weight's layout."""
        if self.experts:
            shape = self.param.shape
            out = shape[-1] if self.transposed else shape[-2]
            return self.matrices(r.reshape(self.experts, out, r.shape[-1]))
        return r.t() if self.transposed else r

    def matches(self, pattern: str) -> bool:
        """True when ``pattern`` matches the module name (or, for fused experts, the key)."""
        return match_pattern(pattern, self.name) or bool(self.experts and match_pattern(pattern, self.key))


def match_pattern(pattern: str, name: str) -> bool:
    """True when module ``name`` matches ``pattern`` (a glob, or a regex after ``re:``)."""
    if pattern.startswith("re:"):
        return re.fullmatch(pattern[3:], name) is not None
    return fnmatch.fnmatchcase(name, pattern)


def _candidates(model: nn.Module) -> list[tuple[str, nn.Module, str, str]]:
    """``(module name, module, parameter name, kind)`` of every weight that may be a target;
    kind ``linear``, ``experts``, ``router`` or ``unknown`` (a layout no rule explains)."""
    out: list[tuple[str, nn.Module, str, str]] = []
    for n, m in model.named_modules(remove_duplicate=False):
        if is_prunable_module(m):
            out.append((n, m, "weight", "router" if _is_gate_linear(n, m) else "linear"))
            continue
        for pn in fused_expert_params(m):
            out.append((n, m, pn, "experts"))
        if is_router(m):
            out.append((n, m, "weight", "router"))
        for pn, _ in unknown_layout_params(m):
            out.append((n, m, pn, "unknown"))
    return out


def _matches(pattern: str, name: str, param_name: str, kind: str) -> bool:
    return match_pattern(pattern, name) or (
        kind in ("experts", "unknown") and match_pattern(pattern, f"{name}.{param_name}")
    )


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
        patterns: module-name patterns; when given, every ``Linear``/``Conv1D``, fused
            expert weight or router whose name matches one is a target, and each pattern
            must match at least one of them.
        exclude: patterns of modules (or fused expert weights) never pruned.
        block_prefixes: module names of the transformer blocks (in order); when
            ``patterns`` is None, the ``Linear``/``Conv1D`` and fused expert weights inside
            these blocks are targets (routers are not). When both are None, every
            ``Linear``/``Conv1D`` except the output embedding, and every fused expert weight,
            is a target.

    Raises:
        ModelError: a pattern matches no prunable module, nothing is left to prune, or a
            selected module has 3-D parameters of an unknown layout.
    """
    conv = conv1d_class()
    candidates = _candidates(model)
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

    known = [c for c in candidates if c[3] != "unknown"]
    selected: list[tuple[str, nn.Module, str, str]] = []
    if patterns is not None:
        for pattern in patterns:
            if not any(_matches(pattern, n, pn, k) for n, _, pn, k in candidates):
                sample = ", ".join(n for n, *_ in known[:6]) or "none"
                raise ModelError(
                    f"pruning.targets: pattern {pattern!r} matches no Linear/Conv1D module, fused experts "
                    f"weight or router; module names look like: {sample}"
                )
        selected = [c for c in candidates if any(_matches(p, c[0], c[2], c[3]) for p in patterns)]
    elif block_prefixes is not None:
        selected = [c for c in candidates if block_of(c[0]) is not None and c[3] != "router"]
    else:
        selected = [
            c
            for c in candidates
            if c[3] != "router" and c[1] is not output_emb and id(getattr(c[1], c[2])) not in embedding_params
        ]
    for pattern in exclude:
        if not any(_matches(pattern, n, pn, k) for n, _, pn, k in candidates):
            raise ModelError(
                f"pruning.exclude: pattern {pattern!r} matches no Linear/Conv1D module, fused experts weight or router"
            )
    selected = [c for c in selected if not any(_matches(p, c[0], c[2], c[3]) for p in exclude)]
    # an unknown layout matters inside the transformer blocks (a ViT's 3-D position embedding does not)
    selected = [c for c in selected if c[3] != "unknown" or block_of(c[0]) is not None]
    unknown = [(n, m) for n, m, _, k in selected if k == "unknown"]
    if unknown:
        name, module = unknown[0]
        params = ", ".join(f"{pn} {list(shape)}" for pn, shape in unknown_layout_params(module))
        raise ModelError(
            f"unknown Mixture-of-Experts layout: module {name!r} ({type(module).__name__}) has parameters of 3 or "
            f"more dimensions ({params}) that no architecture adapter recognises (fused experts need a "
            "'num_experts' attribute and weights shaped (num_experts, out, in)); Artemis will not skip them "
            f"silently. Exclude the module (pruning.exclude: ['{name}']) or add an adapter for it"
        )

    by_param: dict[int, PrunableTarget] = {}
    targets: list[PrunableTarget] = []
    for name, module, param_name, kind in selected:
        param = getattr(module, param_name)
        pid = id(param)
        if pid in by_param:
            by_param[pid].tied_names.append(name)
            continue
        experts = int(param.shape[0]) if kind == "experts" else 0
        t = PrunableTarget(
            name=name,
            module=module,
            param_name=param_name,
            transposed=(conv is not None and isinstance(module, conv))
            or (kind == "experts" and bool(getattr(module, "is_transposed", False))),
            block_index=block_of(name),
            experts=experts,
            kind=kind,
        )
        by_param[pid] = t
        targets.append(t)
    if not targets:
        raise ModelError(
            f"{type(model).__name__} has no prunable weights: no nn.Linear, Conv1D or fused experts module "
            + ("inside its transformer blocks" if block_prefixes is not None else "was selected")
            + "; set pruning.targets to the module names to prune"
        )
    return targets


def coverage_report(
    model: nn.Module, targets: Sequence[PrunableTarget], block_prefixes: Sequence[str]
) -> list[tuple[int, float, list[str]]]:
    """``(block index, share left out, names)`` of every block whose matrix parameters
    (2-D or more) are missed by ``targets`` by more than :data:`COVERAGE_WARN_SHARE`.

    Example:
        >>> import torch.nn as nn
        >>> blocks = nn.ModuleList([nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))])
        >>> ts = find_targets(blocks, patterns=["0.0"])
        >>> coverage_report(blocks, ts, ["0"])
        [(0, 0.5, ['0.1.weight'])]
    """
    covered = {id(t.param) for t in targets}
    out = []
    for i, prefix in enumerate(block_prefixes):
        try:
            block = model.get_submodule(prefix)
        except AttributeError:
            continue
        total = 0
        missed: list[tuple[str, int]] = []
        seen: set[int] = set()
        for pn, p in block.named_parameters():
            if p.dim() < 2 or id(p) in seen:
                continue
            seen.add(id(p))
            total += p.numel()
            if id(p) not in covered:
                missed.append((f"{prefix}.{pn}", p.numel()))
        share = sum(n for _, n in missed) / total if total else 0.0
        if share > COVERAGE_WARN_SHARE:
            out.append((i, share, [n for n, _ in missed]))
    return out
