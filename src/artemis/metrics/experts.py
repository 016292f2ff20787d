"""Per-expert statistics of fused Mixture-of-Experts modules (transformers 5 layout).

transformers 5 stores the experts of an MoE layer as one module with fused 3-D weights
(``MixtralExperts``: ``gate_up_proj`` ``(experts, 2·inter, hidden)``, ``down_proj``
``(experts, hidden, inter)``) and calls it as ``experts(hidden_states, top_k_index,
top_k_weights)``; ``@use_experts_implementation`` may dispatch that call to another
implementation (``grouped_mm``, ``batched_mm``, kernels), none of which calls a
submodule per expert. The statistics here are therefore gathered by a forward
**pre-hook on the experts module** that reads the three routing arguments, which every
implementation receives, and recomputes what it needs with :func:`expert_forward`, a
plain reference computation of one expert (it follows the module's ``has_gate``,
``has_bias``, ``is_transposed``, ``_apply_gate`` and ``act_fn``). It works whatever
implementation the model dispatches to, at the cost of one extra expert computation per
calibration batch.

Two collectors:

* :class:`ExpertInputStats` — for Wanda (``activation``): per expert, the sum over the
  tokens routed to it of ``(r·x_j)²`` for every input feature ``j`` of each fused weight
  (``x`` the expert's input for ``gate_up_proj``, the gated intermediate for
  ``down_proj``; ``r`` the token's router weight for that expert). Weighting by ``r``
  makes the score the first-order error that pruning adds to the MoE layer's output,
  ``Σ_t r_t·ΔW·x_t`` (``metric_options: {expert_weighting: uniform}`` counts every routed
  token once instead). With ``calibrate_all_experts: true`` every calibration token goes
  through every expert (weight 1) for the statistics only; the model's output is unchanged.
* :class:`ExpertUsageStats` — for ``expert_pruning``: per expert, the number of routed
  tokens, the sum of router weights and the REAP sum ``Σ_t r_t·‖E(x_t)‖₂``.

Example:
    >>> import torch
    >>> from transformers import MixtralConfig
    >>> from transformers.models.mixtral.modeling_mixtral import MixtralExperts
    >>> cfg = MixtralConfig(hidden_size=8, intermediate_size=16, num_local_experts=4)
    >>> experts = MixtralExperts(cfg)
    >>> _ = torch.nn.init.normal_(experts.gate_up_proj), torch.nn.init.normal_(experts.down_proj)
    >>> stats = ExpertUsageStats(lambda: (True, None))
    >>> stats.attach(experts, "experts")
    >>> x, idx, w = torch.randn(5, 8), torch.tensor([[0, 1]] * 5), torch.full((5, 2), 0.5)
    >>> _ = experts(x, idx, w)
    >>> stats.count["experts"].tolist()
    [5.0, 5.0, 0.0, 0.0]
    >>> ref = sum(0.5 * expert_forward(experts, x[i : i + 1], 0)[1].norm() for i in range(5))
    >>> bool(torch.isclose(stats.reap["experts"][0].float(), ref))
    True
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

__all__ = ["expert_forward", "routing_arguments", "ExpertInputStats", "ExpertUsageStats", "expert_input_features"]

#: (calibrating, token mask) of the metric driving a collector, read at each call
StateFn = Callable[[], tuple[bool, Optional[Tensor]]]


def _linear(x: Tensor, w: Tensor, b: Optional[Tensor], transposed: bool) -> Tensor:
    y = x @ w if transposed else F.linear(x, w)
    return y + b if b is not None else y


def _has_gate(module: nn.Module) -> bool:
    return bool(getattr(module, "has_gate", hasattr(module, "gate_up_proj")))


def _apply_gate(module: nn.Module, h: Tensor) -> Tensor:
    fn = getattr(module, "_apply_gate", None)
    if callable(fn):
        return fn(h)
    gate, up = h.chunk(2, dim=-1)
    return module.act_fn(gate) * up


def expert_forward(module: nn.Module, x: Tensor, e: int) -> tuple[Tensor, Tensor]:
    """Expert ``e`` of fused-experts ``module`` on tokens ``x`` ``(n, hidden)``: the input
    of ``down_proj`` ``(n, inter)`` and the expert's output ``(n, hidden)`` (before the
    router weight), computed in the weights' dtype."""
    transposed = bool(getattr(module, "is_transposed", False))
    has_bias = bool(getattr(module, "has_bias", False))
    x = x.to(module.down_proj.dtype)
    if _has_gate(module):
        b = module.gate_up_proj_bias[e] if has_bias else None
        h = _apply_gate(module, _linear(x, module.gate_up_proj[e], b, transposed))
    else:
        b = module.up_proj_bias[e] if has_bias else None
        h = module.act_fn(_linear(x, module.up_proj[e], b, transposed))
    b = module.down_proj_bias[e] if has_bias else None
    out = _linear(h, module.down_proj[e], b, transposed)
    if getattr(module, "has_post_expert_norm", False):
        out = module.post_expert_norm(out)
    return h, out


def routing_arguments(args: tuple, kwargs: dict) -> Optional[tuple[Tensor, Tensor, Tensor]]:
    """``(hidden_states (tokens, hidden), top_k_index (tokens, k), top_k_weights (tokens, k))``
    of a call of a fused-experts module, or None when the call does not look like one."""
    names = ("hidden_states", "top_k_index", "top_k_weights")
    vals = list(args[:3]) + [kwargs.get(n) for n in names[len(args[:3]) :]]
    if len(vals) < 3 or not all(isinstance(v, Tensor) for v in vals):
        return None
    x, idx, w = vals
    x = x.reshape(-1, x.shape[-1])
    idx = idx.reshape(x.shape[0], -1)
    w = w.reshape(x.shape[0], -1)
    return x, idx, w


def expert_input_features(module: nn.Module, param_name: str) -> int:
    """Input features of each expert matrix of fused weight ``param_name``."""
    p = getattr(module, param_name)
    return int(p.shape[-2] if getattr(module, "is_transposed", False) else p.shape[-1])


def _token_rows(x: Tensor, mask: Optional[Tensor]) -> Optional[Tensor]:
    """Bool ``(tokens,)`` of the non-padding rows of flattened ``x``, when ``mask`` fits."""
    if mask is None or mask.numel() != x.shape[0]:
        return None
    return mask.reshape(-1).to(device=x.device, dtype=torch.bool)


class _ExpertHook:
    """Shared machinery: one forward pre-hook per fused-experts module."""

    def __init__(self, state: StateFn) -> None:
        self.state = state
        self._handles: list[Any] = []

    def _register(self, module: nn.Module, fn: Callable[[nn.Module, Tensor, Tensor, Tensor, bool], None]) -> None:
        def hook(mod: nn.Module, args: tuple, kwargs: dict) -> None:
            calibrating, mask = self.state()
            if not (calibrating or mod.training):
                return
            call = routing_arguments(args, kwargs)
            if call is None:
                return
            x, idx, w = call
            with torch.no_grad():
                rows = _token_rows(x, mask) if calibrating else None
                if rows is not None:
                    x, idx, w = x[rows], idx[rows], w[rows]
                fn(mod, x.detach(), idx, w.detach(), calibrating)

        self._handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []


class ExpertInputStats(_ExpertHook):
    """Per-expert input-feature sums of squares of fused expert weights (see the module
    docstring). Writes ``sq[key]`` ``(experts, in)`` float32 and ``tokens[key]`` (tokens
    routed to any expert, each routed pair once) into the dicts it is given."""

    def __init__(
        self,
        sq: dict[str, Tensor],
        tokens: dict[str, int],
        state: StateFn,
        *,
        all_experts: bool = False,
        weighting: str = "router",
    ) -> None:
        super().__init__(state)
        self.sq, self.tokens = sq, tokens
        self.all_experts = all_experts
        self.weighting = weighting
        self.on_update: Callable[[], None] = lambda: None

    def attach(self, module: nn.Module, keys: dict[str, str]) -> None:
        """Collect for the fused weights ``{param name: target key}`` of ``module``."""
        n = int(module.num_experts)
        feats = {pn: expert_input_features(module, pn) for pn in keys}

        def collect(mod: nn.Module, x: Tensor, idx: Tensor, w: Tensor, calibrating: bool) -> None:
            every = self.all_experts and calibrating
            for pn, key in keys.items():
                if key not in self.sq:
                    self.sq[key] = torch.zeros(n, feats[pn], dtype=torch.float32, device=x.device)
            count = 0
            for e in range(n):
                if every:
                    xs, r = x, None
                else:
                    tok, pos = torch.where(idx == e)
                    if tok.numel() == 0:
                        continue
                    xs = x[tok]
                    r = w[tok, pos].to(torch.float32) if self.weighting == "router" else None
                count += xs.shape[0]
                h = expert_forward(mod, xs, e)[0] if "down_proj" in keys else None
                for pn, key in keys.items():
                    inp = h if pn == "down_proj" else xs
                    if inp.shape[-1] != feats[pn]:
                        raise ValueError(
                            f"cannot gather input statistics of fused expert weight {key}: its experts take "
                            f"{feats[pn]} features, the layer's input has {inp.shape[-1]}"
                        )
                    sq = inp.to(torch.float32).pow(2)
                    if r is not None:
                        sq = sq * r[:, None].pow(2)
                    self.sq[key][e].add_(sq.sum(0).to(self.sq[key].device))
            for key in keys.values():
                self.tokens[key] = self.tokens.get(key, 0) + count
            self.on_update()

        self._register(module, collect)


class ExpertUsageStats(_ExpertHook):
    """Per-expert routing statistics of each fused-experts module: ``count`` (routed
    tokens), ``weight`` (sum of router weights) and ``reap`` (``Σ r·‖E(x)‖₂``), each a
    float64 ``(experts,)`` tensor keyed by the module's name."""

    def __init__(self, state: StateFn, *, need_outputs: bool = True) -> None:
        super().__init__(state)
        self.need_outputs = need_outputs
        self.count: dict[str, Tensor] = {}
        self.weight: dict[str, Tensor] = {}
        self.reap: dict[str, Tensor] = {}

    def attach(self, module: nn.Module, name: str) -> None:
        n = int(module.num_experts)

        def collect(mod: nn.Module, x: Tensor, idx: Tensor, w: Tensor, calibrating: bool) -> None:
            if name not in self.count:
                for d in (self.count, self.weight, self.reap):
                    d[name] = torch.zeros(n, dtype=torch.float64)
            valid = (idx >= 0) & (idx < n)
            flat = idx[valid].reshape(-1).cpu()
            self.count[name] += torch.bincount(flat, minlength=n)[:n].to(torch.float64)
            self.weight[name].index_add_(0, flat, w[valid].reshape(-1).to(torch.float64).cpu())
            if not self.need_outputs:
                return
            for e in range(n):
                tok, pos = torch.where(idx == e)
                if tok.numel() == 0:
                    continue
                out = expert_forward(mod, x[tok], e)[1].to(torch.float32)
                r = w[tok, pos].to(torch.float32)
                self.reap[name][e] += float((r * out.norm(dim=-1)).sum())

        self._register(module, collect)

    def reset(self) -> None:
        self.count, self.weight, self.reap = {}, {}, {}

    def state_dict(self) -> dict[str, Any]:
        return {"count": dict(self.count), "weight": dict(self.weight), "reap": dict(self.reap)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.count = {k: v.clone().to(torch.float64) for k, v in state.get("count", {}).items()}
        self.weight = {k: v.clone().to(torch.float64) for k, v in state.get("weight", {}).items()}
        self.reap = {k: v.clone().to(torch.float64) for k, v in state.get("reap", {}).items()}
