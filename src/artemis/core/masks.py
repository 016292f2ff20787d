"""Pure functions that turn importance scores into keep-masks with exact counts.

A mask is a ``torch.bool`` tensor shaped like the weight: ``True`` keeps the weight,
``False`` prunes it. Scores are non-negative floats (higher = more important).

Exactness: pruning a fraction ``s`` of ``n`` weights prunes exactly
``round_half_up(s·n)`` of them. Ties at the threshold are broken deterministically:
among equal scores, the weight that comes first (in the order the layers are given,
then in row-major order inside a layer) is pruned first.

The global threshold is found **without concatenating** the scores of all layers
(which is what makes ``torch.nn.utils.prune.global_unstructured`` need about eleven
times the weights' bytes): an exact three-pass radix select over the float32 bit
patterns of the scores. Each pass computes one layer's scores at a time, so the extra
memory is of the order of the largest single layer, whatever the model size.

Sharded scores (FSDP2, several processes): pass a ``collective`` (see
:class:`ShardCollective`; :class:`artemis.core.distributed.ProcessGroupCollective` wraps a
process group). Each rank then scores only its local shards, the radix histograms
(a few KiB) are summed across ranks, and the per-layer tie counts are gathered, so
no rank ever holds more than its own shards. Ties are broken in the order (layer,
rank, local row-major index), which for shards cut contiguously along dim 0 in rank
order (FSDP2's ``Shard(0)``) is exactly the single-process order, so sharded and
single-process runs produce the same masks bit for bit.

Example:
    >>> import torch
    >>> from artemis.core.masks import global_masks, row_masks
    >>> a = torch.tensor([[0.1, 0.9], [0.5, 0.2]])
    >>> b = torch.tensor([0.3, 0.7, 0.05, 0.6])
    >>> [m.int().tolist() for m in global_masks([lambda: a, lambda: b], [4, 4], 0.5)]
    [[[0, 1], [1, 0]], [0, 1, 0, 1]]
    >>> row_masks(a, 0.5).int().tolist()
    [[0, 1], [1, 0]]
"""

from __future__ import annotations

import re
from collections.abc import MutableMapping
from typing import Callable, Optional, Protocol, Sequence

import torch
from torch import Tensor

from artemis.core.schedule import round_half_up

__all__ = [
    "ShardCollective",
    "count_to_prune",
    "score_keys",
    "kth_smallest_key",
    "global_masks",
    "layer_mask",
    "row_masks",
    "parse_nm_pattern",
    "nm_masks",
    "pack_mask",
    "unpack_mask",
    "MaskStore",
]

ScoreFn = Callable[[], Tensor]


class ShardCollective(Protocol):
    """The two collective operations the sharded global threshold needs.

    Attributes:
        rank: this process's index in the group (ranks hold shards in rank order).
    """

    rank: int

    def all_reduce_sum(self, t: Tensor) -> Tensor:
        """Element-wise sum of ``t`` (int64, CPU) over all ranks; returns a CPU tensor."""
        ...

    def all_gather(self, t: Tensor) -> list[Tensor]:
        """``t`` (int64, CPU, same shape on every rank) of every rank, in rank order."""
        ...


# Radix passes over the 31 significant bits of a non-negative float32: 11 + 10 + 10 bits.
_PASSES = ((20, 2048), (10, 1024), (0, 1024))


def count_to_prune(numel: int, sparsity: float) -> int:
    """Number of weights pruned out of ``numel`` at ``sparsity`` (rounded half up)."""
    if not (0.0 <= sparsity <= 1.0):
        raise ValueError(f"sparsity must be in [0, 1], got {sparsity!r}")
    return min(max(round_half_up(sparsity * numel), 0), numel)


def score_keys(scores: Tensor) -> Tensor:
    """Order-preserving int32 keys of non-negative scores (the float32 bit patterns).

    Raises:
        ValueError: a score is negative or NaN (metrics must return scores >= 0).
    """
    s = scores.detach().reshape(-1).to(torch.float32)
    if torch.isnan(s).any():
        raise ValueError("importance scores contain NaN; a metric must return finite scores >= 0")
    keys = s.view(torch.int32)
    if keys.numel() and int(keys.min()) < 0:
        s = s + 0.0  # turns -0.0 into +0.0
        if bool((s < 0).any()):
            raise ValueError(
                f"importance scores must be >= 0, got a minimum of {float(s.min())}; "
                "return magnitudes (for example .abs()) from custom metrics"
            )
        keys = s.view(torch.int32)
    return keys


def kth_smallest_key(
    score_fns: Sequence[ScoreFn],
    k: int,
    *,
    reduce_fn: Optional[Callable[[Tensor], Tensor]] = None,
    layer_counts: Optional[list[int]] = None,
) -> tuple[int, int]:
    """Find the ``k``-th smallest score (1-indexed) across all layers.

    Args:
        score_fns: one zero-argument callable per layer returning that layer's scores.
            Each is called once per radix pass (three times), one layer at a time.
        k: rank, ``1 <= k <= total number of scores``.
        reduce_fn: for scores sharded across processes: sums each pass's histogram
            over the ranks (for example ``ShardCollective.all_reduce_sum``); then
            ``score_fns`` return the local shards and ``k`` counts over all ranks.
        layer_counts: if given, an empty list that receives, per layer, the number
            of *local* scores equal to the returned key (for tie-breaking).

    Returns:
        ``(key, n_below)``: the int32 key of the k-th smallest score and the number of
        scores strictly smaller than it.
    """
    last_hists: list[Tensor] = []
    prefix = 0
    below = 0  # scores whose key is below the current prefix range
    remaining = k
    for depth, (shift, bins) in enumerate(_PASSES):
        hist = None
        for fn in score_fns:
            keys = score_keys(fn())
            if depth > 0:
                hi_shift = _PASSES[depth - 1][0]
                keys = keys[(keys >> hi_shift) == prefix]
            digits = (keys >> shift) & (bins - 1) if depth > 0 else keys >> shift
            h = torch.bincount(digits.to(torch.int64), minlength=bins).cpu()
            hist = h if hist is None else hist + h
            if layer_counts is not None and depth == len(_PASSES) - 1:
                last_hists.append(h)
            del keys, digits
        if hist is None:  # no layer scored on this rank
            hist = torch.zeros(bins, dtype=torch.int64)
        if reduce_fn is not None:
            hist = reduce_fn(hist)
        cum = torch.cumsum(hist, 0)
        digit = int(torch.searchsorted(cum, torch.tensor(remaining, dtype=cum.dtype)))
        before = int(cum[digit - 1]) if digit > 0 else 0
        below += before
        remaining -= before
        prefix = (prefix << (_PASSES[depth - 1][0] - shift) if depth > 0 else 0) | digit
    if layer_counts is not None:
        layer_counts.extend(int(h[digit]) for h in last_hists)
    return prefix, below


def _tie_masks(keys: Tensor, key: int, ties_left: int) -> tuple[Tensor, int]:
    """Keep-mask of one layer: keys above ``key`` kept; the first ``ties_left`` equal
    keys (row-major) pruned, the rest kept."""
    keep = keys > key
    eq = keys == key
    n_eq = int(eq.sum())
    if n_eq == 0:
        return keep, ties_left
    if ties_left >= n_eq:
        return keep, ties_left - n_eq
    if ties_left > 0:
        rank = torch.cumsum(eq.to(torch.int32), 0)
        keep |= eq & (rank > ties_left)
    else:
        keep |= eq
    return keep, 0


def global_masks(
    score_fns: Sequence[ScoreFn],
    numels: Sequence[int],
    sparsity: float,
    *,
    collective: Optional[ShardCollective] = None,
    replicated: Optional[Sequence[bool]] = None,
) -> list[Tensor]:
    """Keep-masks pruning exactly ``round_half_up(sparsity·N)`` of the ``N`` scores overall.

    Args:
        score_fns: one callable per layer returning its scores (any shape). Called four
            times per layer (three radix passes and the mask pass), never all at once.
        numels: number of scores of each layer, in the same order (with ``collective``:
            the full, unsharded sizes).
        sparsity: fraction to prune, in [0, 1].
        collective: scores are sharded across the ranks of this group; every rank
            calls ``global_masks`` with the same layers and gets the masks of its own
            shards (see the module docstring).
        replicated: with ``collective``, marks layers whose scores every rank holds in
            full (identical on all ranks): they are counted once (rank 0's copy).

    Returns:
        One bool mask per layer, shaped like that layer's (local) scores.
    """
    if len(score_fns) != len(numels):
        raise ValueError(f"got {len(score_fns)} score functions but {len(numels)} sizes")
    total = int(sum(numels))
    k = count_to_prune(total, sparsity)
    masks: list[Tensor] = []
    if k == 0:
        for fn in score_fns:
            s = fn()
            masks.append(torch.ones(s.shape, dtype=torch.bool, device=s.device))
        return masks
    if collective is not None:
        return _sharded_global_masks(score_fns, k, collective, replicated)
    key, below = kth_smallest_key(score_fns, k)
    ties_left = k - below
    for fn in score_fns:
        s = fn()
        keys = score_keys(s)
        keep, ties_left = _tie_masks(keys, key, ties_left)
        masks.append(keep.view(s.shape))
    return masks


def _sharded_global_masks(
    score_fns: Sequence[ScoreFn],
    k: int,
    collective: ShardCollective,
    replicated: Optional[Sequence[bool]],
) -> list[Tensor]:
    """The collective version of the radix select and the tie-breaking mask pass."""
    rep = [False] * len(score_fns) if replicated is None else [bool(r) for r in replicated]
    if len(rep) != len(score_fns):
        raise ValueError(f"got {len(score_fns)} score functions but {len(rep)} replicated flags")
    # Replicated layers are counted once, from rank 0's copy.
    counted = [i for i, r in enumerate(rep) if not r or collective.rank == 0]
    local_counts: list[int] = []
    key, below = kth_smallest_key(
        [score_fns[i] for i in counted], k, reduce_fn=collective.all_reduce_sum, layer_counts=local_counts
    )
    eq_local = torch.zeros(len(score_fns), dtype=torch.int64)
    for i, c in zip(counted, local_counts):
        eq_local[i] = c
    eq = torch.stack(collective.all_gather(eq_local))  # (ranks, layers)
    layer_eq = eq.sum(0)
    ties_left = k - below  # ties pruned, in (layer, rank, local index) order
    masks: list[Tensor] = []
    before = 0  # ties in earlier layers, all ranks
    for i, fn in enumerate(score_fns):
        s = fn()
        keys = score_keys(s)
        offset = before + (0 if rep[i] else int(eq[: collective.rank, i].sum()))
        keep, _ = _tie_masks(keys, key, min(max(ties_left - offset, 0), int(keys.numel())))
        masks.append(keep.view(s.shape))
        before += int(layer_eq[i])
    return masks


def layer_mask(scores: Tensor, sparsity: float) -> Tensor:
    """Keep-mask pruning exactly ``round_half_up(sparsity·numel)`` of one tensor's scores."""
    return global_masks([lambda: scores], [scores.numel()], sparsity)[0]


def row_masks(scores: Tensor, sparsity: float) -> Tensor:
    """Keep-mask pruning ``round_half_up(sparsity·cols)`` weights in every output row.

    ``scores`` is 2-D ``(out_features, in_features)``; ties inside a row go to the
    lower column index (stable sort).
    """
    if scores.dim() != 2:
        raise ValueError(f"row_masks needs 2-D scores (out, in), got shape {tuple(scores.shape)}")
    rows, cols = scores.shape
    k = count_to_prune(cols, sparsity)
    keep = torch.ones(rows, cols, dtype=torch.bool, device=scores.device)
    if k == 0:
        return keep
    s = scores.detach().to(torch.float32)
    if torch.isnan(s).any() or bool((s < 0).any()):
        raise ValueError("importance scores must be finite and >= 0")
    order = torch.sort(s, dim=1, stable=True).indices[:, :k]  # (rows, k) lowest scores
    keep.scatter_(1, order, False)
    return keep


def parse_nm_pattern(pattern: str) -> tuple[int, int]:
    """``"N:M"`` → ``(N, M)``: keep N weights in every group of M consecutive input weights.

    Example:
        >>> parse_nm_pattern("2:4")
        (2, 4)
        >>> parse_nm_pattern("4:4")
        Traceback (most recent call last):
        ...
        ValueError: pattern is not valid: ...
    """
    m = re.fullmatch(r"\s*(\d+)\s*:\s*(\d+)\s*", str(pattern))
    if m is None or not (0 < int(m.group(1)) < int(m.group(2)) <= 128):
        raise ValueError(
            "pattern is not valid: write 'N:M' with 0 < N < M <= 128 (N kept in every group of M "
            f"consecutive input weights), for example '2:4' or '4:8'; got {pattern!r}"
        )
    return int(m.group(1)), int(m.group(2))


def nm_masks(scores: Tensor, n: int, m: int) -> Tensor:
    """N:M keep-mask: in every group of ``m`` consecutive input weights of a row keep
    the ``n`` highest scores (among equal scores the lower index is pruned first).

    ``scores`` is 2-D with ``in_features`` divisible by ``m``.
    """
    if not (0 < n < m):
        raise ValueError(f"N:M pattern needs 0 < N < M, got {n}:{m}")
    if scores.dim() != 2 or scores.shape[1] % m != 0:
        raise ValueError(
            f"N:M pattern {n}:{m} needs 2-D scores whose columns divide by {m}, got shape {tuple(scores.shape)}"
        )
    rows, cols = scores.shape
    groups = scores.detach().to(torch.float32).reshape(rows, cols // m, m)
    order = torch.sort(groups, dim=2, stable=True).indices[..., : m - n]  # pruned within each group
    keep = torch.ones_like(groups, dtype=torch.bool)
    keep.scatter_(2, order, False)
    return keep.reshape(rows, cols)


# ------------------------------------------------------------------ storage
_BIT_WEIGHTS_CACHE: dict[torch.device, Tensor] = {}


def _bit_weights(device: torch.device) -> Tensor:
    w = _BIT_WEIGHTS_CACHE.get(device)
    if w is None:
        w = _BIT_WEIGHTS_CACHE[device] = torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.uint8, device=device)
    return w


def pack_mask(mask: Tensor) -> Tensor:
    """A bool mask packed 8 elements per byte (little bit order), on the mask's device.

    Returns a flat ``uint8`` tensor of ``ceil(numel / 8)`` bytes; :func:`unpack_mask`
    with the shape gives the mask back.

    Example:
        >>> import torch
        >>> m = torch.tensor([[True, False, True], [False, False, True]])
        >>> pack_mask(m).tolist()  # bits 0, 2, 5 set: 1 + 4 + 32
        [37]
        >>> torch.equal(unpack_mask(pack_mask(m), m.shape), m)
        True
    """
    if mask.dtype != torch.bool:
        raise ValueError(f"pack_mask needs a bool mask, got {mask.dtype}")
    flat = mask.reshape(-1)
    pad = (-flat.numel()) % 8
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    return (flat.view(-1, 8).to(torch.uint8) * _bit_weights(flat.device)).sum(-1, dtype=torch.uint8)


def unpack_mask(packed: Tensor, shape: Sequence[int]) -> Tensor:
    """The bool mask of ``shape`` stored by :func:`pack_mask`.

    Example:
        >>> import torch
        >>> unpack_mask(torch.tensor([37], dtype=torch.uint8), (2, 3)).int().tolist()
        [[1, 0, 1], [0, 0, 1]]
    """
    n = 1
    for s in shape:
        n *= int(s)
    if packed.dtype != torch.uint8 or packed.dim() != 1 or packed.numel() != (n + 7) // 8:
        raise ValueError(
            f"a packed mask of shape {tuple(shape)} needs {(n + 7) // 8} uint8 bytes, got "
            f"{tuple(packed.shape)}/{packed.dtype}"
        )
    bits = torch.bitwise_and(packed.unsqueeze(-1), _bit_weights(packed.device)) != 0
    return bits.view(-1)[:n].view(tuple(shape))


class MaskStore(MutableMapping):
    """The manager's masks: a mapping of key → bool mask that can keep them packed.

    With ``packed=False`` it holds bool tensors (1 byte per weight, fastest to apply).
    With ``packed=True`` each mask is kept as 1 bit per weight (:func:`pack_mask`) and
    unpacked on every read (``store[key]``, ``get``, ``items``, ``values``): between
    pruning events only the mask being applied exists at full size, so an 8B-parameter
    model's masks take 0.9 GiB instead of 7 GiB, for the cost of an unpack wherever a mask
    is applied. At a pruning event the new masks are computed at full size (as with bool
    storage), and ``PruningManager.state_dict()`` holds bool masks (the checkpoint format
    does not depend on this option). A read returns a new tensor when packed; changing it
    does not change the store (assign to the key).

    Example:
        >>> import torch
        >>> s = MaskStore(packed=True)
        >>> s["w"] = torch.tensor([True, False, True])
        >>> s["w"].tolist(), s.nbytes()
        ([True, False, True], 1)
    """

    def __init__(self, packed: bool = False) -> None:
        self.packed = packed
        self._data: dict[str, Tensor] = {}
        self._shapes: dict[str, tuple[int, ...]] = {}

    def __setitem__(self, key: str, mask: Tensor) -> None:
        if mask.dtype != torch.bool:
            raise ValueError(f"mask for {key!r} must be bool, got {mask.dtype}")
        if self.packed:
            self._shapes[key] = tuple(mask.shape)
            self._data[key] = pack_mask(mask)
        else:
            self._data[key] = mask

    def __getitem__(self, key: str) -> Tensor:
        value = self._data[key]
        return unpack_mask(value, self._shapes[key]) if self.packed else value

    def __delitem__(self, key: str) -> None:
        del self._data[key]
        self._shapes.pop(key, None)

    def __iter__(self):
        return iter(self._data)

    def __len__(self) -> int:
        return len(self._data)

    def __contains__(self, key: object) -> bool:
        return key in self._data

    def copy(self) -> "MaskStore":
        """A shallow copy (the stored tensors are shared, nothing is unpacked)."""
        out = MaskStore(self.packed)
        out._data = dict(self._data)
        out._shapes = dict(self._shapes)
        return out

    def nbytes(self) -> int:
        """Bytes the stored masks occupy."""
        return sum(t.numel() * t.element_size() for t in self._data.values())

    def __repr__(self) -> str:
        return f"MaskStore(packed={self.packed}, keys={list(self._data)!r})"

    def __reduce__(self):
        return (_rebuild_store, (self.packed, dict(self._data), dict(self._shapes)))


def _rebuild_store(packed: bool, data: dict, shapes: dict) -> MaskStore:
    out = MaskStore(packed)
    out._data, out._shapes = data, shapes  # stored as they were (packed stays packed)
    return out
