"""Efficiency-Transformer: train only the layers worth training, share adjacent layers.

Two independent tools, both driven by per-block measurements taken on the dense
model before anything is changed:

* **Adaptive layer selection** — :func:`layer_importance` scores every transformer
  block (the blocks the architecture adapter finds), :func:`select_trainable_layers`
  keeps the top fraction and :func:`freeze_layers` sets ``requires_grad=False`` on every
  parameter of the other blocks. The default score is *Block Influence* (ShortGPT,
  Men et al. 2024): ``BI_i = 1 − mean_t cos(x_t, y_t)`` between a block's input and
  output hidden state at every (non-padding) token — a block that barely turns its
  input is not worth training. ``magnitude`` (RMS of the block's weight matrices) is a
  data-free alternative.
* **Cross-layer parameter sharing** — :func:`adjacent_similarity` runs block ``i`` on
  the inputs block ``i+1`` saw and compares the two *residual updates*
  (``f_i(x) − x`` vs ``f_{i+1}(x) − x``) by cosine: a pair whose blocks do nearly the same
  thing to the same input can share one set of weights at little cost.
  :func:`choose_shared_pairs` picks the most similar non-overlapping pairs and
  :func:`share_adjacent_layers` ties them: every parameter of block ``i+1`` becomes the
  very same ``nn.Parameter`` object as the matching parameter of block ``i`` (ALBERT
  style), so the pair stores and trains one copy and gradients from both uses add up.

Example:
    >>> import torch
    >>> from artemis.finetune.efficiency import choose_shared_pairs, select_trainable_layers
    >>> select_trainable_layers(torch.tensor([0.5, 0.1, 0.3, 0.2]), fraction=0.5)
    [0, 2]
    >>> choose_shared_pairs(torch.tensor([0.9, 0.95, 0.2]), 2)
    [(1, 2)]
"""

from __future__ import annotations

import logging
import math
from typing import Any, Iterable, Optional, Sequence

import torch
import torch.nn as nn
from torch import Tensor

from artemis.arch import ArchitectureAdapter
from artemis.arch.gates import CACHE_ARGS, block_hidden
from artemis.core.errors import ConfigError, ModelError
from artemis.metrics.blocks import block_influence, feed_batches, layer_importance, model_blocks, token_weights

__all__ = [
    "block_influence",
    "layer_importance",
    "select_trainable_layers",
    "freeze_layers",
    "adjacent_similarity",
    "choose_shared_pairs",
    "share_adjacent_layers",
    "untie_shared_layers",
]

logger = logging.getLogger(__name__)


def select_trainable_layers(
    scores: Tensor,
    *,
    fraction: Optional[float] = None,
    k: Optional[int] = None,
    shared_pairs: Sequence[tuple[int, int]] = (),
) -> list[int]:
    """Indices of the blocks to train: the ``k`` (or ``ceil(fraction·n)``) highest scores.

    Ties break towards the earlier block. A block tied to a selected block by
    ``shared_pairs`` is added too (it *is* the same weights, so it will change).

    Args:
        scores: ``(num_blocks,)`` importance.
        fraction: fraction of blocks to keep, in (0, 1].
        k: number of blocks to keep (instead of ``fraction``).
        shared_pairs: pairs tied by :func:`share_adjacent_layers`.

    Returns:
        Sorted block indices.

    Raises:
        ConfigError: neither or both of ``fraction``/``k``, or out of range.
    """
    n = int(scores.numel())
    if (fraction is None) == (k is None):
        raise ConfigError("give exactly one of fraction= or k= to select_trainable_layers")
    if fraction is not None:
        if not 0.0 < fraction <= 1.0:
            raise ConfigError(f"trainable_layer_fraction must be in (0, 1], got {fraction!r}")
        k = max(1, math.ceil(fraction * n - 1e-9))
    assert k is not None
    if not 1 <= k <= n:
        raise ConfigError(f"k must be between 1 and the number of blocks ({n}), got {k!r}")
    order = sorted(range(n), key=lambda i: (-float(scores[i]), i))
    chosen = set(order[:k])
    for a, b in shared_pairs:
        if a in chosen or b in chosen:
            chosen.update((a, b))
    return sorted(chosen)


def freeze_layers(
    model: nn.Module, trainable: Sequence[int], *, adapter: Optional[ArchitectureAdapter] = None
) -> list[str]:
    """Set ``requires_grad=False`` on every parameter of the blocks not in ``trainable``.

    Parameters outside the blocks (embeddings, norms, head) are left as they are.

    Returns:
        Names of the parameters frozen here (each shared parameter once).

    Raises:
        ConfigError: an index out of range.
    """
    blocks = model_blocks(model, adapter)
    bad = [i for i in trainable if not 0 <= i < len(blocks)]
    if bad:
        raise ConfigError(f"trainable layer indices {bad} are out of range for {len(blocks)} blocks")
    keep = set(trainable)
    keep_ids = {id(p) for i in keep for p in blocks[i].parameters()}
    frozen: list[str] = []
    for i, block in enumerate(blocks):
        if i in keep:
            continue
        for name, p in block.named_parameters():
            if id(p) in keep_ids:  # shared with a trained block
                continue
            if p.requires_grad:
                p.requires_grad_(False)
                frozen.append(f"{i}.{name}")
    return frozen


@torch.no_grad()
def adjacent_similarity(
    model: nn.Module,
    data: Iterable[dict],
    *,
    adapter: Optional[ArchitectureAdapter] = None,
    max_batches: Optional[int] = 1,
) -> Tensor:
    """How well block ``i`` could stand in for block ``i+1``, for every adjacent pair.

    Block ``i`` is run on the exact inputs (hidden state and keyword arguments such as
    position embeddings and attention mask) that block ``i+1`` received, and the two
    residual updates are compared token by token:
    ``sim_i = mean_t cos(f_i(x_t) − x_t, f_{i+1}(x_t) − x_t)``.

    Args:
        model: the model (not modified).
        data: calibration batches (inputs are held in memory per batch).
        adapter: its architecture adapter.
        max_batches: batches used (default 1).

    Returns:
        float32 tensor ``(num_blocks − 1,)`` in [−1, 1]; higher = more alike.
    """
    blocks = model_blocks(model, adapter)
    n = len(blocks)
    if n < 2:
        raise ModelError(f"cross-layer sharing needs at least 2 blocks; the model has {n}")
    captured: dict[int, tuple[tuple, dict]] = {}
    outputs: dict[int, Tensor] = {}
    sums = torch.zeros(n - 1, dtype=torch.float64)
    counts = torch.zeros(n - 1, dtype=torch.float64)
    current_mask: list[Optional[Tensor]] = [None]
    handles = []

    def pre(i: int):
        def hook(mod: nn.Module, args: tuple, kwargs: dict) -> None:
            kw = {k: (None if k in CACHE_ARGS else v) for k, v in kwargs.items()}
            if "use_cache" in kw:
                kw["use_cache"] = False
            captured[i] = (args, kw)

        return hook

    def post(i: int):
        def hook(mod: nn.Module, args: tuple, out: Any) -> None:
            outputs[i] = block_hidden(out)

        return hook

    for i, block in enumerate(blocks):
        handles.append(block.register_forward_pre_hook(pre(i), with_kwargs=True))
        handles.append(block.register_forward_hook(post(i)))

    def each(data: Iterable[dict]):
        for batch in data:
            current_mask[0] = batch.get("attention_mask") if isinstance(batch, dict) else None
            captured.clear()
            outputs.clear()
            yield batch
            # the forward of this batch has run: compare the pairs
            for h in handles:
                h.remove()
            try:
                for i in range(n - 1):
                    args, kw = captured[i + 1]
                    x = (args[0] if args else kw["hidden_states"]).float()
                    y_next = outputs[i + 1].float()
                    y_here = block_hidden(blocks[i](*args, **kw)).float()
                    cos = torch.nn.functional.cosine_similarity(y_here - x, y_next - x, dim=-1)
                    w = token_weights(current_mask[0], cos)
                    sums[i] += float((cos * w).sum())
                    counts[i] += float(w.sum())
            finally:
                handles.clear()
                for j, block in enumerate(blocks):
                    handles.append(block.register_forward_pre_hook(pre(j), with_kwargs=True))
                    handles.append(block.register_forward_hook(post(j)))

    try:
        feed_batches(model, each(data), max_batches)
    finally:
        for h in handles:
            h.remove()
    return (sums / counts.clamp_min(1)).float()


def choose_shared_pairs(similarity: Tensor, n_pairs: int) -> list[tuple[int, int]]:
    """The ``n_pairs`` most similar adjacent pairs ``(i, i+1)`` that share no block.

    Greedy by similarity (ties towards the earlier pair); fewer pairs are returned when
    no more non-overlapping ones exist.

    Raises:
        ConfigError: ``n_pairs < 1``.
    """
    if n_pairs < 1:
        raise ConfigError(f"shared_layer_pairs must be at least 1, got {n_pairs!r}")
    order = sorted(range(similarity.numel()), key=lambda i: (-float(similarity[i]), i))
    used: set[int] = set()
    pairs: list[tuple[int, int]] = []
    for i in order:
        if len(pairs) == n_pairs:
            break
        if i in used or i + 1 in used:
            continue
        pairs.append((i, i + 1))
        used.update((i, i + 1))
    if len(pairs) < n_pairs:
        logger.warning("only %d non-overlapping adjacent pairs exist; sharing %d", len(pairs), len(pairs))
    return sorted(pairs)


def share_adjacent_layers(
    model: nn.Module,
    pairs: Sequence[tuple[int, int]],
    *,
    adapter: Optional[ArchitectureAdapter] = None,
) -> int:
    """Tie block ``j``'s parameters to block ``i``'s for every pair ``(i, j)``.

    Every parameter of block ``j`` whose relative name and shape match one in block
    ``i`` is replaced by block ``i``'s ``nn.Parameter`` (same object, same storage);
    block ``j``'s old values are dropped. Calling it again after adapters were attached
    ties the new adapter parameters too (already tied ones are skipped).

    Args:
        model: the model, modified in place.
        pairs: ``(i, j)`` block index pairs (``j`` uses ``i``'s parameters).
        adapter: its architecture adapter.

    Returns:
        Number of parameters newly tied.

    Raises:
        ConfigError: an index out of range or a block in two pairs; nothing is changed.
        ModelError: the two blocks have parameters of different shapes.
    """
    blocks = model_blocks(model, adapter)
    n = len(blocks)
    seen: set[int] = set()
    plan: list[tuple[nn.Module, str, nn.Parameter]] = []
    for i, j in pairs:
        if not (0 <= i < n and 0 <= j < n) or i == j:
            raise ConfigError(f"shared pair {(i, j)} is not a pair of distinct block indices in [0, {n})")
        if i in seen or j in seen:
            raise ConfigError(f"block {i if i in seen else j} appears in more than one shared pair")
        seen.update((i, j))
        src = dict(blocks[i].named_parameters(remove_duplicate=False))
        for name, p in blocks[j].named_parameters(remove_duplicate=False):
            q = src.get(name)
            if q is None:
                continue
            if q.shape != p.shape:
                raise ModelError(
                    f"blocks {i} and {j} cannot share {name!r}: shapes {tuple(q.shape)} and {tuple(p.shape)} differ"
                )
            if q is p:
                continue
            owner_name, _, attr = name.rpartition(".")
            owner = blocks[j].get_submodule(owner_name) if owner_name else blocks[j]
            plan.append((owner, attr, q))
    for owner, attr, q in plan:
        setattr(owner, attr, q)
    return len(plan)


@torch.no_grad()
def untie_shared_layers(
    model: nn.Module,
    pairs: Sequence[tuple[int, int]],
    *,
    adapter: Optional[ArchitectureAdapter] = None,
) -> int:
    """Give block ``j`` of every pair its own copy of the parameters it shares with block ``i``.

    Values are unchanged; only the storage is split, so a checkpoint format that
    cannot hold shared tensors (safetensors via ``save_pretrained`` drops the duplicate
    and would re-initialise it on load) saves a model that reloads exactly.

    Returns:
        Number of parameters copied.
    """
    blocks = model_blocks(model, adapter)
    copied = 0
    for i, j in pairs:
        src = {id(p) for p in blocks[i].parameters()}
        for name, p in list(blocks[j].named_parameters(remove_duplicate=False)):
            if id(p) not in src:
                continue
            owner_name, _, attr = name.rpartition(".")
            owner = blocks[j].get_submodule(owner_name) if owner_name else blocks[j]
            setattr(owner, attr, nn.Parameter(p.detach().clone(), requires_grad=p.requires_grad))
            copied += 1
    return copied
