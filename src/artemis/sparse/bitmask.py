"""The sparse-bitmask codec: compress a 2-D tensor to its kept values plus one bit per
weight, decompress it back, and check every part on the way in.

The layout is compressed-tensors' ``sparse-bitmask`` format: ``compressed`` (the non-zero
values, row-major), ``bitmask`` (uint8, one bit per weight, each row packed with
``numpy.packbits(..., bitorder="little")``), ``shape`` (int64) and ``row_offsets`` (int64,
index of each row's first value). :mod:`artemis.sparse.checkpoint` stores pruned weights
in it and :mod:`artemis.sparse.inference` multiplies with it.

Example:
    >>> import torch
    >>> w = torch.tensor([[0.0, 2.0, 0.0], [3.0, 0.0, 4.0]])
    >>> parts = bitmask_compress(w)
    >>> parts["compressed"].tolist(), parts["bitmask"].tolist(), parts["row_offsets"].tolist()
    ([2.0, 3.0, 4.0], [[2], [5]], [0, 1])
    >>> torch.equal(bitmask_decompress(parts), w)
    True
"""

from __future__ import annotations

import math
from typing import NamedTuple, Optional

import numpy as np
import torch
from torch import Tensor

from artemis.core.errors import CheckpointError
from artemis.sparse import kernels

__all__ = [
    "bitmask_compress",
    "bitmask_decompress",
    "nonzero_mask",
    "check_parts",
    "SparseParts",
    "empty_dense",
    "decode_into",
    "as_dense",
    "SPARSE_KEYS",
]

SPARSE_KEYS = ("compressed", "bitmask", "shape", "row_offsets")

# ------------------------------------------------------------ tensor layout
_POPCOUNT = np.array([bin(i).count("1") for i in range(256)], dtype=np.uint8)


def _row_counts(bits: np.ndarray) -> np.ndarray:
    """Set bits per row of a packed uint8 bitmask (int64)."""
    if hasattr(np, "bitwise_count"):  # numpy >= 2.0
        return np.bitwise_count(bits).sum(axis=1, dtype=np.int64)
    return _POPCOUNT[bits].sum(axis=1, dtype=np.int64)


_INT_VIEW = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _as_int_numpy(t: Tensor) -> np.ndarray:
    """The raw bits of CPU tensor ``t`` as a numpy integer array (no copy)."""
    if t.dtype == torch.int8:
        return t.numpy()
    return t.view(_INT_VIEW[t.element_size()]).numpy()


def nonzero_mask(t: Tensor) -> np.ndarray:
    """``t != 0`` computed on its bits (``-0.0`` counts as zero), in numpy (fast on CPU)."""
    bits = _as_int_numpy(t)
    if t.is_floating_point():
        sign = np.array(1, dtype=bits.dtype) << np.array(8 * t.element_size() - 1, dtype=bits.dtype)
        return (bits & ~sign) != 0
    return bits != 0


def bitmask_compress(t: Tensor, mask: Optional[np.ndarray] = None) -> dict[str, Tensor]:
    """A 2-D tensor in the sparse-bitmask layout (CPU tensors).

    Args:
        t: the 2-D tensor; its zeros (``+0.0`` and ``-0.0``) are not stored.
        mask: ``t != 0`` if already computed (a numpy bool array).

    Returns:
        ``{"compressed": values, "bitmask": uint8 (rows, ceil(cols/8)), "shape": int64 (2,),
        "row_offsets": int64 (rows,)}``.

    Example:
        >>> import torch
        >>> d = bitmask_compress(torch.tensor([[0.0, 2.0, 0.0], [3.0, 0.0, 4.0]]))
        >>> d["compressed"].tolist(), d["bitmask"].tolist(), d["row_offsets"].tolist()
        ([2.0, 3.0, 4.0], [[2], [5]], [0, 1])
    """
    t = t.detach().cpu().contiguous()
    if t.dim() != 2:
        raise ValueError(f"bitmask_compress needs a 2-D tensor, got shape {tuple(t.shape)}")
    if mask is None:
        mask = nonzero_mask(t)
    bits = np.packbits(mask, axis=-1, bitorder="little")
    counts = _row_counts(bits)
    values = torch.from_numpy(np.take(_as_int_numpy(t).reshape(-1), np.flatnonzero(mask))).view(t.dtype)
    return {
        "compressed": values,
        "bitmask": torch.from_numpy(bits),
        "shape": torch.tensor(list(t.shape), dtype=torch.int64),
        "row_offsets": torch.from_numpy(np.cumsum(counts) - counts),
    }


class SparseParts(NamedTuple):
    """The checked parts of one sparse-bitmask tensor, ready to decode."""

    rows: int
    cols: int
    bits: np.ndarray  # uint8 (rows, ceil(cols/8)), C-contiguous
    values: Tensor  # 1-D, the kept values
    vals: np.ndarray  # their raw bits (integer view of ``values``)
    offsets: np.ndarray  # int64 (rows,)
    where: str  # "tensor '<name>' in <file>", for messages
    prefix: str  # the module name, for messages
    kernel: bool  # decode with the compiled kernel (decided once, so the checks match the decoder)


def check_parts(parts: dict[str, Tensor], name: str, file: str) -> SparseParts:
    """Check a sparse-bitmask tensor's parts and views them for the decoders.

    Names, shapes, dtypes and the bits past the last column are checked here; the counts
    (kept weights vs values, row offsets) here too when numpy decodes, and by the
    compiled decoder row by row otherwise (one pass over the bits instead of two)."""
    where = f"tensor {name!r} in {file}"
    prefix = name[: -len(".weight")] if name.endswith(".weight") else name
    missing = [k for k in SPARSE_KEYS if k not in parts]
    if missing:
        raise CheckpointError(f"{where}: missing {', '.join(f'{prefix}.{k}' for k in missing)}")
    shape_t, bits, values, offsets = parts["shape"], parts["bitmask"], parts["compressed"], parts["row_offsets"]
    if shape_t.dim() != 1 or shape_t.numel() != 2 or shape_t.dtype not in (torch.int64, torch.int32):
        raise CheckpointError(f"{where}: {prefix}.shape must hold 2 integers, got {shape_t.tolist()!r}")
    rows, cols = (int(v) for v in shape_t.tolist())
    if rows < 0 or cols < 0:
        raise CheckpointError(f"{where}: {prefix}.shape is negative: {[rows, cols]}")
    want = (rows, math.ceil(cols / 8))
    if bits.dtype != torch.uint8 or tuple(bits.shape) != want:
        raise CheckpointError(
            f"{where}: bitmask {prefix}.bitmask has shape {tuple(bits.shape)}/{bits.dtype}; a {rows}x{cols} "
            f"weight needs {want}/torch.uint8 (the bitmask does not match the shape)"
        )
    if values.dim() != 1:
        raise CheckpointError(f"{where}: {prefix}.compressed must be 1-D, got shape {tuple(values.shape)}")
    bits_np = np.ascontiguousarray(bits.numpy())
    if cols % 8 and rows and np.any(bits_np[:, -1] >> (cols % 8)):
        raise CheckpointError(f"{where}: {prefix}.bitmask has bits set beyond column {cols}")
    values = values.contiguous()
    if tuple(offsets.shape) != (rows,):
        raise CheckpointError(f"{where}: {prefix}.row_offsets has shape {tuple(offsets.shape)}; expected {(rows,)}")
    vals = _as_int_numpy(values)
    kernel = kernels.decode_ready(vals.itemsize) and rows > 0 and cols > 0
    sp = SparseParts(
        rows, cols, bits_np, values, vals, np.ascontiguousarray(offsets.to(torch.int64).numpy()), where, prefix, kernel
    )
    if not kernel or sp.offsets[0] != 0:  # else the compiled decoder checks the counts as it goes
        _check_counts(sp)
    return sp


def _check_counts(sp: SparseParts) -> None:
    """The bitmask's count of kept weights must match the values and the row offsets."""
    counts = _row_counts(sp.bits)
    nnz = int(counts.sum())
    if nnz != sp.vals.size:
        raise CheckpointError(
            f"{sp.where}: the bitmask marks {nnz} non-zero weights but {sp.prefix}.compressed holds "
            f"{sp.vals.size} values"
        )
    if not np.array_equal(sp.offsets, np.cumsum(counts) - counts):
        raise CheckpointError(f"{sp.where}: {sp.prefix}.row_offsets does not match the bitmask's row counts")


def empty_dense(sp: SparseParts) -> np.ndarray:
    """The flat output for :func:`decode_into`: uninitialised where the compiled kernel
    writes every item, zeros where numpy scatters only the kept ones."""
    if sp.kernel:
        return torch.empty(sp.rows * sp.cols, dtype=sp.values.dtype).view(_INT_VIEW[sp.vals.itemsize]).numpy()
    return np.zeros(sp.rows * sp.cols, dtype=sp.vals.dtype)


def decode_into(sp: SparseParts, out: np.ndarray) -> None:
    """All rows of ``sp`` into ``out`` (from :func:`empty_dense`). Releases the GIL in
    its heavy part (both paths), so threads can decode several tensors at once."""
    if sp.kernel:
        end = kernels.decode_rows(sp.bits, sp.vals, sp.offsets, sp.cols, out, 0, sp.rows)
        if end != sp.vals.size:  # a wrong offset or count: say which, as the numpy checks word it
            _check_counts(sp)
            raise CheckpointError(f"{sp.where}: the bitmask does not match {sp.prefix}.row_offsets/compressed")
        return
    if sp.rows == 0 or sp.cols == 0:
        return
    mask = np.unpackbits(sp.bits, axis=-1, count=sp.cols, bitorder="little").view(np.bool_)
    out[np.flatnonzero(mask)] = sp.vals  # ~3x faster than boolean-mask assignment in numpy


def as_dense(sp: SparseParts, out: np.ndarray) -> Tensor:
    return torch.from_numpy(out.reshape(sp.rows, sp.cols)).view(sp.values.dtype)


def bitmask_decompress(parts: dict[str, Tensor], *, name: str = "tensor", file: str = "?") -> Tensor:
    """Rebuild the dense tensor from :func:`bitmask_compress` parts, checking every part.

    Decodes with :mod:`artemis.sparse.kernels`' compiled AVX-512 kernel where the CPU has it,
    otherwise (AVX2 and other CPUs) with numpy; both give the same bits.

    Args:
        parts: ``compressed``, ``bitmask``, ``shape`` and ``row_offsets`` tensors.
        name: the weight's name, for messages.
        file: the file it came from, for messages.

    Returns:
        The dense tensor (``values.dtype``).

    Raises:
        CheckpointError: a part is missing or inconsistent (the message names ``name``
            and ``file``).

    Example:
        >>> import torch
        >>> w = torch.tensor([[0.0, 2.0, 0.0], [3.0, 0.0, 4.0]])
        >>> torch.equal(bitmask_decompress(bitmask_compress(w)), w)
        True
    """
    sp = check_parts(parts, name, file)
    out = empty_dense(sp)
    decode_into(sp, out)
    return as_dense(sp, out)
