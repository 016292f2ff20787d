"""Mixture-of-Experts layers: where they are, how they route, how experts are removed.

transformers 5 stores the routed experts of an MoE layer as **one module with fused 3-D
weights** (``MixtralExperts``: ``gate_up_proj`` ``(experts, 2·inter, hidden)``,
``down_proj`` ``(experts, hidden, inter)``; GPT-OSS stores them transposed, with biases)
next to a **router** (``MixtralTopKRouter``: ``weight`` ``(experts, hidden)``, returning
``(logits, top-k weights, top-k indices)``) and, in some families, **shared experts**
(Qwen2-MoE's ``shared_expert`` MLP of ``nn.Linear`` and its ``shared_expert_gate``,
DeepSeek-V3's ``shared_experts``). :func:`find_moe_layers` finds them in each block by
their structure (:func:`artemis.core.targets.fused_expert_params`,
:func:`artemis.core.targets.is_router`), so a renamed attribute does not go unnoticed.

How the router turns logits into the top-k weights is family-specific; the adapter's
``moe_routing`` names it (:func:`route`):

* ``softmax_topk_norm`` — softmax over all experts, top-k, renormalised to sum 1 (Mixtral);
* ``softmax_topk`` — softmax, top-k, renormalised when the router's ``norm_topk_prob``
  is true (Qwen2-MoE, Qwen3-MoE, OLMoE);
* ``topk_softmax`` — top-k of the logits, softmax over those k (GPT-OSS);
* None — not supported for expert removal (DeepSeek-V3's grouped, biased routing).

Removing experts (:func:`remove_experts`) slices every per-expert tensor of the experts
module (3-D weights, 2-D biases) and the router's rows (and bias), keeping the kept
experts' values bit for bit, and updates ``num_experts``/``top_k`` on the modules.
With the removed experts gone, the router's softmax runs over the kept experts only,
which is exactly the original router with the removed experts' logits set to ``-inf``.

Example:
    >>> import torch
    >>> from transformers import MixtralConfig, MixtralForCausalLM
    >>> from artemis.arch import get_adapter
    >>> cfg = MixtralConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
    ...                     num_attention_heads=2, num_key_value_heads=1, num_local_experts=4)
    >>> model = MixtralForCausalLM(cfg)
    >>> [(l.experts_name, l.router_name, l.num_experts) for l in find_moe_layers(model, get_adapter(model))]
    [('model.layers.0.mlp.experts', 'model.layers.0.mlp.gate', 4)]
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Optional, Sequence

import torch
import torch.nn as nn
from torch import Tensor

from artemis.core.errors import ModelError
from artemis.core.targets import fused_expert_params, is_router

if TYPE_CHECKING:  # pragma: no cover
    from artemis.arch.base import ArchitectureAdapter

__all__ = [
    "MoELayer",
    "find_moe_layers",
    "route",
    "remove_experts",
    "apply_expert_counts",
    "set_expert_config",
    "ROUTINGS",
]

ROUTINGS = ("softmax_topk_norm", "softmax_topk", "topk_softmax")

#: config attributes holding the number of routed experts, by family
_EXPERT_COUNT_ATTRS = ("num_local_experts", "num_experts", "n_routed_experts")


@dataclass
class MoELayer:
    """One MoE layer of a model.

    Attributes:
        block_index: index of the transformer block holding it.
        name: module name of the sparse-MoE module (``model.layers.0.mlp``).
        module: that module.
        experts_name, experts: the fused-experts module.
        router_name, router: the router.
        shared: module names of shared experts and their gates (never removed).
    """

    block_index: int
    name: str
    module: nn.Module
    experts_name: str
    experts: nn.Module
    router_name: str
    router: nn.Module
    shared: list[str] = field(default_factory=list)

    @property
    def num_experts(self) -> int:
        return int(self.experts.num_experts)

    @property
    def top_k(self) -> int:
        return int(self.router.top_k)

    def expert_params(self) -> list[str]:
        """Names of the experts module's per-expert tensors (3-D weights and 2-D biases)."""
        n = self.num_experts
        return [pn for pn, p in self.experts.named_parameters(recurse=False) if p.dim() >= 2 and p.shape[0] == n]

    def expert_numel(self) -> int:
        """Parameters of one expert (its slices of every per-expert tensor, router row included)."""
        n = self.num_experts
        per = sum(getattr(self.experts, pn).numel() // n for pn in self.expert_params())
        return per + sum(p.numel() // n for p in self.router.parameters(recurse=False) if p.shape[0] == n)

    def expert_bytes(self) -> int:
        n = self.num_experts
        tensors = [getattr(self.experts, pn) for pn in self.expert_params()]
        tensors += [p for p in self.router.parameters(recurse=False) if p.shape[0] == n]
        return sum(t.numel() // n * t.element_size() for t in tensors)


def find_moe_layers(model: nn.Module, adapter: "ArchitectureAdapter") -> list[MoELayer]:
    """Every MoE layer in the blocks of ``model`` (empty for a dense model).

    Raises:
        ModelError: a fused-experts module has no router beside it (or several).
    """
    if adapter.blocks is None:
        return []
    layers: list[MoELayer] = []
    for index, prefix in enumerate(adapter.block_prefixes()):
        block = model.get_submodule(prefix)
        for rel, module in block.named_modules():
            if not fused_expert_params(module):
                continue
            parent_rel = rel.rpartition(".")[0]
            parent = block.get_submodule(parent_rel) if parent_rel else block
            base = f"{prefix}.{parent_rel}" if parent_rel else prefix
            routers = [
                (n, c) for n, c in parent.named_children() if is_router(c) and c.num_experts == module.num_experts
            ]
            if len(routers) != 1:
                raise ModelError(
                    f"fused experts {prefix}.{rel} ({type(module).__name__}) have "
                    f"{'no router' if not routers else 'several routers'} beside them in {base} "
                    f"(a module with num_experts={module.num_experts}, top_k and weight (experts, hidden)); "
                    "this MoE layout is not supported"
                )
            rname, router = routers[0]
            shared = [f"{base}.{n}" for n, _ in parent.named_children() if n.startswith("shared_expert")]
            layers.append(MoELayer(index, base, parent, f"{prefix}.{rel}", module, f"{base}.{rname}", router, shared))
    return layers


def route(routing: str, router: nn.Module, logits: Tensor) -> tuple[Tensor, Tensor]:
    """``(top-k weights, top-k indices)`` of ``logits`` ``(tokens, experts)`` by ``routing``
    (see the module docstring), as the family's router computes them."""
    k = int(router.top_k)
    if routing == "topk_softmax":
        top, idx = torch.topk(logits, k, dim=-1)
        return torch.softmax(top, dim=1, dtype=top.dtype), idx
    if routing not in ("softmax_topk_norm", "softmax_topk"):
        raise ModelError(f"unknown MoE routing {routing!r}; valid: {', '.join(ROUTINGS)}")
    probs = torch.softmax(logits.float(), dim=-1)
    top, idx = torch.topk(probs, k, dim=-1)
    if routing == "softmax_topk_norm" or getattr(router, "norm_topk_prob", False):
        top = top / top.sum(dim=-1, keepdim=True)
    if routing == "softmax_topk":
        top = top.to(logits.dtype)
    return top, idx


@torch.no_grad()
def remove_experts(layer: MoELayer, keep: Sequence[int]) -> None:
    """Keep only experts ``keep`` (sorted, original indices) of ``layer``: every per-expert
    tensor and the router's rows are sliced (values bit for bit), ``num_experts`` and
    ``top_k`` updated on the experts, the router and the MoE module."""
    keep = sorted(int(i) for i in keep)
    n = layer.num_experts
    if not keep or any(not 0 <= i < n for i in keep) or len(set(keep)) != len(keep):
        raise ModelError(f"{layer.name}: cannot keep experts {keep} of {n}")
    if len(keep) == n:
        return
    idx = torch.tensor(keep, dtype=torch.long)

    def slice_params(module: nn.Module) -> None:
        for pn, p in list(module.named_parameters(recurse=False)):
            if p.dim() >= 1 and p.shape[0] == n:
                if p.device.type == "meta":
                    new = torch.empty((len(keep), *p.shape[1:]), dtype=p.dtype, device=p.device)
                else:
                    new = p.detach().index_select(0, idx.to(p.device)).clone()
                setattr(module, pn, nn.Parameter(new, requires_grad=p.requires_grad))
        for bn, b in list(module.named_buffers(recurse=False)):
            if b is not None and b.dim() >= 1 and b.shape[0] == n and b.device.type != "meta":
                module._buffers[bn] = b.index_select(0, idx.to(b.device)).clone()

    slice_params(layer.experts)
    slice_params(layer.router)
    m = len(keep)
    for mod in (layer.experts, layer.router, layer.module):
        if isinstance(getattr(mod, "num_experts", None), int):
            mod.num_experts = m
        if isinstance(getattr(mod, "top_k", None), int):
            mod.top_k = min(mod.top_k, m)


def set_expert_config(config: Any, counts: Sequence[Optional[int]]) -> Optional[dict[str, Any]]:
    """Record per-layer expert counts in a transformers ``config``: with one count in every
    MoE layer, ``num_experts``/``num_local_experts`` become it (a stock model); otherwise
    they become the largest count and ``config.moe_sparsity_config`` holds compressed-tensors'
    ``ExpertSparsityConfig`` (``{"method": "prune", "num_experts": [...]}``, None for dense
    layers), which :func:`artemis.load_pruned` applies. ``num_experts_per_tok`` is capped at
    the smallest count. Returns the ``moe_sparsity_config`` written (or None)."""
    present = [c for c in counts if c is not None]
    if not present:
        return None
    for attr in _EXPERT_COUNT_ATTRS:
        if isinstance(getattr(config, attr, None), int):
            setattr(config, attr, max(present))
    k = getattr(config, "num_experts_per_tok", None)
    if isinstance(k, int):
        config.num_experts_per_tok = min(k, min(present))
    if len(set(present)) == 1:
        if hasattr(config, "moe_sparsity_config"):
            del config.moe_sparsity_config
        return None
    data: dict[str, Any] = {"method": "prune", "num_experts": list(counts)}
    try:  # validated by compressed-tensors' own model when it is installed
        from compressed_tensors.config import ExpertSparsityConfig

        data = ExpertSparsityConfig.model_validate(data).model_dump(mode="json")
    except ImportError:  # pragma: no cover - compressed-tensors is optional
        pass
    config.moe_sparsity_config = data
    return data


def apply_expert_counts(model: nn.Module, counts: Sequence[Optional[int]]) -> None:
    """Shrink each MoE layer ``i`` of a freshly built ``model`` to ``counts[i]`` experts
    (the first ones: a pruned checkpoint stores the kept experts left-shifted); used by
    :func:`artemis.load_pruned` for ``moe_sparsity_config``."""
    from artemis.arch.base import get_adapter

    adapter = get_adapter(model)
    if adapter.blocks is None or len(counts) != adapter.num_blocks:
        raise ModelError(f"moe_sparsity_config has {len(counts)} layer counts; the model has {adapter.num_blocks}")
    layers = {layer.block_index: layer for layer in find_moe_layers(model, adapter)}
    for i, c in enumerate(counts):
        if c is None:
            continue
        if i not in layers:
            raise ModelError(f"moe_sparsity_config gives layer {i} {c} experts, but it is not an MoE layer")
        if c > layers[i].num_experts:
            raise ModelError(f"moe_sparsity_config gives layer {i} {c} experts; it has {layers[i].num_experts}")
        remove_experts(layers[i], range(c))
