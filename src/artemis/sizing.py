"""Size accounting shared by the pruning summary and the exporter.

The dense size is what ``save_pretrained`` writes: every unique parameter and
persistent buffer at its own dtype. The compressed size stores each *sparse* weight
in the sparse-bitmask layout used by ``artemis.export``: the values of the non-zero
weights (in the weight's dtype, or one byte each for int8), one bit per weight packed
row by row, and one int32 row offset per row; every other tensor stays dense. This is
the number ``model_size_reduction`` reports, so it is never simply the sparsity.

Example:
    >>> import torch
    >>> w = torch.zeros(4, 16); w[0, :4] = 1.0
    >>> sparse_tensor_bytes(w)      # 4 values·4 B + 4 rows·2 B of bits + 4 rows·4 B of offsets
    40
    >>> dense_tensor_bytes(w)
    256
"""

from __future__ import annotations

import math
from typing import Iterable, Optional

import torch
import torch.nn as nn
from torch import Tensor

__all__ = [
    "MIB",
    "dense_tensor_bytes",
    "sparse_tensor_bytes",
    "unique_state_tensors",
    "model_dense_bytes",
    "model_compressed_bytes",
]

MIB = 1024 * 1024


def dense_tensor_bytes(t: Tensor) -> int:
    return t.numel() * t.element_size()


def _rows_cols(shape: torch.Size) -> tuple[int, int]:
    if len(shape) == 0:
        return 1, 1
    if len(shape) == 1:
        return 1, int(shape[0])
    return int(shape[0]), int(math.prod(shape[1:]))


def sparse_tensor_bytes(t: Tensor, *, value_bytes: Optional[int] = None, nnz: Optional[int] = None) -> int:
    """Bytes of ``t`` in the sparse-bitmask layout (values + row-packed bits + row offsets).

    Args:
        t: the tensor (its zeros are not stored).
        value_bytes: bytes per stored value; default ``t.element_size()`` (1 for int8 export).
        nnz: number of stored values, if already known.
    """
    rows, cols = _rows_cols(t.shape)
    if nnz is None:
        nnz = int(torch.count_nonzero(t))
    vb = t.element_size() if value_bytes is None else value_bytes
    return nnz * vb + rows * math.ceil(cols / 8) + 4 * rows


def unique_state_tensors(model: nn.Module) -> Iterable[tuple[str, Tensor]]:
    """(name, tensor) of every parameter and persistent buffer, each storage once."""
    seen: set[int] = set()
    non_persistent: set[str] = set()
    for mod_name, mod in model.named_modules():
        for b in getattr(mod, "_non_persistent_buffers_set", ()):
            non_persistent.add(f"{mod_name}.{b}" if mod_name else b)
    for name, p in model.named_parameters():
        if id(p) not in seen:
            seen.add(id(p))
            yield name, p
    for name, b in model.named_buffers():
        if name in non_persistent or id(b) in seen:
            continue
        seen.add(id(b))
        yield name, b


def model_dense_bytes(model: nn.Module) -> int:
    """Bytes of the model stored densely at its own dtypes."""
    return sum(dense_tensor_bytes(t) for _, t in unique_state_tensors(model))


def model_compressed_bytes(
    model: nn.Module,
    sparse_params: Iterable[Tensor],
    *,
    value_bytes: Optional[int] = None,
    nnz: Optional[dict[int, int]] = None,
) -> int:
    """Bytes of the model when ``sparse_params`` are stored in the sparse-bitmask layout.

    Args:
        sparse_params: the tensors stored sparse (by identity).
        value_bytes: bytes per stored sparse value (default: each tensor's own).
        nnz: optional ``id(tensor) -> non-zero count`` to avoid counting again.
    """
    sparse_ids = {id(p) for p in sparse_params}
    total = 0
    for _, t in unique_state_tensors(model):
        if id(t) in sparse_ids:
            total += sparse_tensor_bytes(
                t, value_bytes=value_bytes, nnz=None if nnz is None else nnz.get(id(t))
            )
        else:
            total += dense_tensor_bytes(t)
    return total
