"""Hybrid LoRA-Adapter: low-rank adapters (from ``peft``) on a sparse, frozen base.

Lifecycle::

    manager = create_pruning_manager(cfg, model)      # masks keyed by plain names
    peft_model = attach_lora(model, manager, r=8)     # base frozen, adapters trainable
    ... train the adapters; manager.step() keeps pruning the frozen base ...
    # either keep the adapter apart (the unmerged inference path: sparse W x + B A x)
    # or fold it in without losing the sparsity:
    base, report = merge_lora_preserving_sparsity(peft_model, manager, eval_batches)

``peft`` wraps each targeted ``nn.Linear`` in a ``lora.Linear`` whose ``base_layer``
is the *same* module, so the weight ``model.layers.0.self_attn.q_proj.weight`` becomes
``...q_proj.base_layer.weight`` by name but stays the same ``nn.Parameter`` object. The
pruning manager holds its targets by module and parameter object, so its pruning
events keep masking the frozen base after wrapping (tested).

A plain merge adds the dense update ``ΔW = (alpha/r)·B A`` to every weight and so
destroys the sparsity. :func:`merge_lora_preserving_sparsity` adds ``ΔW`` and then
re-applies the mask (``W ← (W + ΔW) ⊙ M``), and reports what that costs: the fraction
of ``‖ΔW‖²`` that fell on pruned positions, the density a plain merge would have left,
and — given evaluation batches — how far the merged model's outputs moved from the
unmerged adapter model (mean cosine, loss before and after).

Example:
    >>> import torch, torch.nn as nn
    >>> from artemis.finetune.lora import attach_lora, merge_lora_preserving_sparsity
    >>> torch.manual_seed(0) and None
    >>> net = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
    >>> masks = {"0.weight": torch.rand(8, 8) > 0.5}
    >>> with torch.no_grad(): _ = net[0].weight.mul_(masks["0.weight"])
    >>> pm = attach_lora(net, masks, r=2, target_modules=["0"])
    >>> with torch.no_grad(): _ = pm.base_model.model[0].lora_B["default"].weight.fill_(0.1)
    >>> base, report = merge_lora_preserving_sparsity(pm, masks)
    >>> bool(((base[0].weight != 0) <= masks["0.weight"]).all()), report.layers_merged
    (True, 1)
"""

from __future__ import annotations

import collections.abc
import logging
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, Iterable, Mapping, Optional, Sequence, Union

import torch
import torch.nn as nn
from torch import Tensor

from artemis.arch import get_adapter, unwrap_model
from artemis.core.errors import ConfigError, ModelError, PruningStateError
from artemis.core.targets import is_prunable_module, match_pattern
from artemis.finetune.config import require_peft

if TYPE_CHECKING:  # pragma: no cover
    from artemis.core.manager import PruningManager

__all__ = [
    "MergeReport",
    "attach_lora",
    "lora_target_names",
    "merge_lora_preserving_sparsity",
    "normalize_param_name",
    "masks_by_parameter",
    "count_parameters",
]

logger = logging.getLogger(__name__)

MasksLike = Union["PruningManager", Mapping[str, Tensor]]


def normalize_param_name(name: str) -> str:
    """The plain-model name of a parameter of a peft-wrapped model.

    >>> normalize_param_name("base_model.model.model.layers.0.mlp.up_proj.base_layer.weight")
    'model.layers.0.mlp.up_proj.weight'
    """
    if name.startswith("base_model.model."):
        name = name[len("base_model.model.") :]
    return name.replace(".base_layer.", ".")


def _plain_model(model: nn.Module) -> nn.Module:
    model = unwrap_model(model)
    peft = _peft_or_none()
    if peft is not None and isinstance(model, peft.PeftModel):
        return model.base_model.model
    return model


def _peft_or_none() -> Any:
    try:
        import peft
    except ImportError:
        return None
    return peft


class _MasksById(collections.abc.Mapping):
    """``{id(parameter): mask}`` view of a manager's mask store; reads a mask only when asked."""

    def __init__(self, store: Mapping[str, Tensor], keys: dict[int, str]) -> None:
        self._store, self._keys = store, keys

    def __getitem__(self, pid: int) -> Tensor:
        return self._store[self._keys[pid]]

    def __iter__(self):
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)


def masks_by_parameter(model: nn.Module, masks: MasksLike) -> Mapping[int, Tensor]:
    """``{id(parameter): keep-mask}`` for the masks of a manager or a name → mask dict.

    Names are matched against the plain model's names (peft's ``base_model.model.``
    prefix and ``.base_layer.`` are ignored), so masks taken before wrapping resolve.

    Raises:
        ModelError: a mask names no parameter of the model, or its shape differs.
    """
    from artemis.core.manager import PruningManager

    if isinstance(masks, PruningManager):
        if masks.finalized:
            raise PruningStateError(
                "the pruning manager is finalized and no longer holds masks; merge before finalize(), "
                "or pass the masks as a dict"
            )
        store = masks.masks
        keys = {id(masks._params[k]): k for k in store}
        return _MasksById(store, keys)  # read (unpacked) one at a time, when used
    params = {normalize_param_name(n): p for n, p in unwrap_model(model).named_parameters(remove_duplicate=False)}
    out: dict[int, Tensor] = {}
    for key, mask in masks.items():
        p = params.get(normalize_param_name(key))
        if p is None:
            sample = ", ".join(list(params)[:4])
            raise ModelError(f"mask {key!r} names no parameter of the model (names look like: {sample})")
        if tuple(mask.shape) != tuple(p.shape):
            raise ModelError(f"mask {key!r} has shape {tuple(mask.shape)}, the parameter {tuple(p.shape)}")
        out[id(p)] = mask.to(device=p.device, dtype=torch.bool)
    return out


def lora_target_names(
    model: nn.Module,
    target_modules: Optional[Sequence[str]] = None,
    layers: Optional[Sequence[int]] = None,
) -> list[str]:
    """Full names of the ``Linear`` modules that get an adapter.

    Args:
        model: the plain (not yet wrapped) model.
        target_modules: name suffixes (``q_proj``) or patterns (``*.mlp.*``, ``re:...``);
            ``None`` = every ``Linear``/``Conv1D`` inside the transformer blocks (or every
            one except the output embedding when the model has no block list).
        layers: only modules inside these block indices.

    Raises:
        ConfigError: a suffix/pattern matches nothing, or nothing is selected.
    """
    adapter = get_adapter(model)
    prefixes = adapter.block_prefixes() if adapter.blocks is not None else []
    out_emb = model.get_output_embeddings() if callable(getattr(model, "get_output_embeddings", None)) else None
    candidates = [(n, m) for n, m in model.named_modules() if is_prunable_module(m) and n and m is not out_emb]

    def block_of(name: str) -> Optional[int]:
        for i, p in enumerate(prefixes):
            if name.startswith(p + "."):
                return i
        return None

    if target_modules is None:
        names = [n for n, _ in candidates if not prefixes or block_of(n) is not None]
    else:
        names = []
        for t in target_modules:
            hit = [n for n, _ in candidates if n == t or n.endswith("." + t) or match_pattern(t, n)]
            if not hit:
                raise ConfigError(
                    f"fine_tuning.lora.target_modules: {t!r} matches no Linear module; names look like: "
                    + ", ".join(n for n, _ in candidates[:4])
                )
            names.extend(h for h in hit if h not in names)
    if layers is not None:
        if not prefixes:
            raise ModelError("layer selection needs a model with transformer blocks")
        keep = set(layers)
        names = [n for n in names if block_of(n) in keep]
    if not names:
        raise ConfigError("no module is left to attach a LoRA adapter to (check target_modules and layers)")
    order = {n: i for i, (n, _) in enumerate(candidates)}
    return sorted(names, key=order.__getitem__)


def attach_lora(
    model: nn.Module,
    manager_or_masks: Optional[MasksLike] = None,
    r: int = 8,
    alpha: float = 16.0,
    target_modules: Optional[Sequence[str]] = None,
    *,
    layers: Optional[Sequence[int]] = None,
    dropout: float = 0.0,
) -> nn.Module:
    """Wrap ``model`` with ``peft`` LoRA adapters on a frozen base; return the ``PeftModel``.

    Every base parameter is frozen (``requires_grad=False``), so the pruned weights stay
    exactly as the masks left them; only the adapters train. The model is wrapped in
    place (the manager created on it keeps working).

    Args:
        model: the plain model (pruned or about to be pruned).
        manager_or_masks: the pruning manager (or name → mask dict); when given, every
            masked weight is checked to be still reachable in the wrapped model.
        r: adapter rank. alpha: LoRA alpha. dropout: LoRA dropout.
        target_modules: see :func:`lora_target_names`.
        layers: attach only inside these blocks (adaptive layer selection).

    Raises:
        ConfigError: ``peft`` missing (the message says how to install it), bad rank,
            or nothing to target.
    """
    peft = require_peft()
    if not isinstance(r, int) or r < 1:
        raise ConfigError(f"fine_tuning.lora.r must be a positive integer, got {r!r}")
    plain = _plain_model(model)
    if isinstance(unwrap_model(model), peft.PeftModel):
        raise ModelError("the model already has peft adapters; attach_lora() expects the plain model")
    names = lora_target_names(plain, target_modules, layers)
    before = masks_by_parameter(plain, manager_or_masks) if manager_or_masks is not None else {}
    cfg = peft.LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=names, bias="none")
    wrapped = peft.get_peft_model(plain, cfg)
    ids = {id(p) for p in wrapped.parameters()}
    lost = [k for k in before if k not in ids]
    if lost:  # pragma: no cover - would be a peft behaviour change
        raise ModelError(f"{len(lost)} masked weights are no longer parameters of the wrapped model")
    logger.info("LoRA r=%d on %d modules; %d trainable parameters", r, len(names), count_parameters(wrapped)[0])
    return wrapped


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """``(trainable, total)`` parameter counts, each shared parameter once."""
    trainable = total = 0
    for p in model.parameters():  # parameters() yields each Parameter object once
        total += p.numel()
        if p.requires_grad:
            trainable += p.numel()
    return trainable, total


@dataclass
class MergeReport:
    """What :func:`merge_lora_preserving_sparsity` did and what it cost.

    Attributes:
        layers_merged: adapter modules folded in (a shared pair counts once).
        masked_layers: of those, how many had a mask re-applied.
        delta_energy_lost: ``Σ‖ΔW ⊙ ¬M‖² / Σ‖ΔW‖²`` over masked layers — the share of the
            adapter update that pruned positions could not keep.
        sparsity_before: sparsity of the masked weights before the merge.
        sparsity_after: after the merge (equal to ``sparsity_before`` up to weights that
            were already zero inside the mask).
        sparsity_plain_merge: what a plain ``merge_and_unload()`` would have left.
        output_cosine: mean cosine between the unmerged and merged models' outputs
            (logits or last hidden state) per token, when ``eval_batches`` were given.
        loss_unmerged / loss_merged: mean loss on ``eval_batches`` holding ``labels``.
    """

    layers_merged: int = 0
    masked_layers: int = 0
    delta_energy_lost: float = 0.0
    sparsity_before: float = 0.0
    sparsity_after: float = 0.0
    sparsity_plain_merge: float = 0.0
    output_cosine: Optional[float] = None
    loss_unmerged: Optional[float] = None
    loss_merged: Optional[float] = None
    notes: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@torch.no_grad()
def _outputs(model: nn.Module, batches: Sequence[dict]) -> tuple[list[Tensor], Optional[float]]:
    device = next(model.parameters()).device
    outs, losses = [], []
    for batch in batches:
        b = {k: v.to(device) if isinstance(v, Tensor) else v for k, v in batch.items()}
        o = model(**b)
        t = getattr(o, "logits", None)
        if t is None:
            t = getattr(o, "last_hidden_state", None)
        if t is None:
            t = o[0] if isinstance(o, (tuple, list)) else o
        outs.append(t.float().cpu())
        loss = getattr(o, "loss", None)
        if loss is not None:
            losses.append(float(loss))
    return outs, (sum(losses) / len(losses) if losses else None)


@torch.no_grad()
def merge_lora_preserving_sparsity(
    model: nn.Module,
    masks: MasksLike,
    eval_batches: Optional[Iterable[dict]] = None,
) -> tuple[nn.Module, MergeReport]:
    """Fold the LoRA adapters into the base weights and re-apply the pruning masks.

    ``W ← (W + ΔW) ⊙ M`` for every adapted weight with a mask (``W + ΔW`` where there is
    none); the peft wrappers are then removed. Blocks tied by cross-layer sharing hold
    one base weight and one adapter, which is merged once.

    Args:
        model: the ``PeftModel`` returned by :func:`attach_lora`.
        masks: the pruning manager (before ``finalize()``) or a name → keep-mask dict.
        eval_batches: optional batches; the report then compares unmerged and merged
            outputs (and losses when the batches hold ``labels``).

    Returns:
        ``(plain model, MergeReport)``.

    Raises:
        ModelError: ``model`` has no peft adapters, an adapter was already merged, or
            two blocks share a base weight but not their adapters (no single merge is
            exact then). Checked before anything is changed.
    """
    peft = require_peft()
    from peft.tuners.lora import LoraLayer

    pm = unwrap_model(model)
    if not isinstance(pm, peft.PeftModel):
        raise ModelError(f"merge_lora_preserving_sparsity() expects a peft model, got {type(pm).__name__}")
    by_param = masks_by_parameter(pm, masks)
    batches = list(eval_batches) if eval_batches is not None else None

    # ---- plan: one delta per distinct base weight; nothing is modified yet
    plan: dict[int, tuple[nn.Parameter, Tensor]] = {}
    adapters_of: dict[int, tuple] = {}
    for name, module in pm.named_modules():
        if not isinstance(module, LoraLayer):
            continue
        if getattr(module, "merged", False):
            raise ModelError(f"{name}: the adapter is already merged; merge with this function instead")
        weight = module.get_base_layer().weight
        key = tuple(id(p) for p in module.parameters() if p is not weight and p.requires_grad) or (id(module),)
        if id(weight) in plan:
            if adapters_of[id(weight)] != key:
                raise ModelError(
                    f"{name}: its base weight is shared with another block but its adapter is not; "
                    "tie the adapters too (share_adjacent_layers after attach_lora) before merging"
                )
            continue
        delta = torch.zeros_like(weight)
        for adapter_name in module.active_adapters:
            if adapter_name in module.lora_A:
                delta += module.get_delta_weight(adapter_name).to(weight.dtype)
        plan[id(weight)] = (weight, delta)
        adapters_of[id(weight)] = key

    report = MergeReport(layers_merged=len(plan))
    before_out, report.loss_unmerged = _outputs(pm, batches) if batches else (None, None)

    total_delta = lost_delta = 0.0
    n_masked = zeros_before = zeros_after = zeros_plain = 0
    for pid, (weight, delta) in plan.items():
        mask = by_param.get(pid)
        merged = weight + delta
        if mask is None:
            weight.copy_(merged)
            continue
        n_masked += weight.numel()
        report.masked_layers += 1
        d = delta.float()
        total_delta += float(d.pow(2).sum())
        lost_delta += float(d.masked_fill(mask, 0).pow(2).sum())
        zeros_before += weight.numel() - int(torch.count_nonzero(weight))
        zeros_plain += weight.numel() - int(torch.count_nonzero(merged))
        weight.copy_(merged * mask)
        zeros_after += weight.numel() - int(torch.count_nonzero(weight))
    if n_masked:
        report.sparsity_before = zeros_before / n_masked
        report.sparsity_after = zeros_after / n_masked
        report.sparsity_plain_merge = zeros_plain / n_masked
        report.delta_energy_lost = lost_delta / total_delta if total_delta > 0 else 0.0
    else:
        report.notes.append("no adapted weight had a mask; this was a plain merge")
    base = pm.base_model.unload()  # wrappers removed; weights already hold the merge
    if batches:
        after_out, report.loss_merged = _outputs(base, batches)
        cos = [torch.nn.functional.cosine_similarity(a, b, dim=-1).mean() for a, b in zip(before_out, after_out)]
        report.output_cosine = float(torch.stack(cos).mean())
    logger.info(
        "merged %d adapters; %.2f%% of the update energy fell on pruned weights",
        report.layers_merged,
        100 * report.delta_energy_lost,
    )
    return base, report
