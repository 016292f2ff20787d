"""Size accounting shared by the pruning summary and the exporter.

The dense size is what ``save_pretrained`` writes: every unique parameter and
persistent buffer at its own dtype. The compressed size stores each *sparse* 2-D weight
in the ``sparse-bitmask`` layout of compressed-tensors that ``artemis.sparse.checkpoint`` writes:

* ``<module>.compressed`` — the non-zero values (in the weight's dtype, or one byte
  each for int8);
* ``<module>.bitmask`` — one bit per weight, packed row by row (``rows·ceil(cols/8)`` B);
* ``<module>.row_offsets`` — one int64 per row (the index of each row's first value);
* ``<module>.shape`` — the dense shape, one int64 per dimension;

and, for an int8 layer, ``<module>.weight_scale``: one float32 per output channel.
A fused Mixture-of-Experts weight ``(experts, rows, cols)`` is stored as its 2-D reshape
``(experts·rows, cols)`` (its 3-D shape goes to the export's JSON metadata).
A candidate weight is stored sparse only when that is smaller than storing it dense
(:func:`stored_weight_bytes` decides, for the summary and the exporter alike); every
other tensor stays dense. This is the number ``model_size_reduction`` reports, so it
is never simply the sparsity. The few kB of safetensors header and JSON files are
not counted.

Example:
    >>> import torch
    >>> w = torch.zeros(4, 16); w[0, :4] = 1.0
    >>> sparse_tensor_bytes(w)      # 4 values·4 B + 4 rows·2 B of bits + 4·8 B offsets + 2·8 B shape
    72
    >>> dense_tensor_bytes(w)
    256
    >>> stored_weight_bytes(w, quantize="int8")   # 4 values·1 B + 8 + 32 + 16, + 4 scales·4 B
    76
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
    "stored_weight_bytes",
    "stores_sparse",
    "ROW_OFFSET_BYTES",
    "SHAPE_ENTRY_BYTES",
    "SCALE_BYTES",
    "QUANTIZE_CHOICES",
    "unique_state_tensors",
    "model_dense_bytes",
    "model_compressed_bytes",
    "layer_row",
]

MIB = 1024 * 1024
#: bytes of one row offset (int64, as compressed-tensors' ``bitmask_compress`` writes)
ROW_OFFSET_BYTES = 8
#: bytes of one entry of the stored dense shape (int64)
SHAPE_ENTRY_BYTES = 8
#: bytes of one per-output-channel int8 scale (float32)
SCALE_BYTES = 4
#: valid values of ``quantize`` in the exporter and the accounting
QUANTIZE_CHOICES = (None, "int8")


def dense_tensor_bytes(t: Tensor) -> int:
    return t.numel() * t.element_size()


def _rows_cols(shape: torch.Size) -> tuple[int, int]:
    if len(shape) >= 3:  # fused experts: stored as (experts·rows, cols)
        return int(math.prod(shape[:-1])), int(shape[-1])
    if len(shape) == 0:
        return 1, 1
    if len(shape) == 1:
        return 1, int(shape[0])
    return int(shape[0]), int(math.prod(shape[1:]))


def sparse_tensor_bytes(t: Tensor, *, value_bytes: Optional[int] = None, nnz: Optional[int] = None) -> int:
    """Bytes of ``t`` in the sparse-bitmask layout (values + row-packed bits + row
    offsets + shape), as stored (a HF ``Conv1D`` weight is stored ``(in, out)``).

    Args:
        t: the tensor (its zeros are not stored).
        value_bytes: bytes per stored value; default ``t.element_size()`` (1 for int8 export).
        nnz: number of stored values, if already known.

    Returns:
        The byte count.
    """
    rows, cols = _rows_cols(t.shape)
    if nnz is None:
        nnz = int(torch.count_nonzero(t))
    vb = t.element_size() if value_bytes is None else value_bytes
    return nnz * vb + rows * math.ceil(cols / 8) + ROW_OFFSET_BYTES * rows + SHAPE_ENTRY_BYTES * min(max(t.dim(), 1), 2)


def _check_quantize(quantize: Optional[str]) -> None:
    if quantize not in QUANTIZE_CHOICES:
        raise ValueError(f"quantize must be None or 'int8', got {quantize!r}")


def stores_sparse(t: Tensor, *, quantize: Optional[str] = None, nnz: Optional[int] = None) -> bool:
    """True when the exporter stores candidate weight ``t`` in the bitmask layout: it is
    2-D (or a 3-D fused-experts weight, stored as ``(experts·rows, cols)``) and that
    layout is smaller than the dense one (at int8 when ``quantize="int8"``).

    Example:
        >>> import torch
        >>> stores_sparse(torch.ones(8, 8)), stores_sparse(torch.zeros(8, 8))
        (False, True)
    """
    _check_quantize(quantize)
    if t.dim() not in (2, 3):
        return False
    vb = 1 if (quantize == "int8" or t.dtype == torch.int8) else t.element_size()
    if nnz is None:
        nnz = int(torch.count_nonzero(t))
    return sparse_tensor_bytes(t, value_bytes=vb, nnz=nnz) < t.numel() * vb


def stored_weight_bytes(
    t: Tensor, *, quantize: Optional[str] = None, nnz: Optional[int] = None, transposed: bool = False
) -> int:
    """Bytes the exporter writes for candidate weight ``t`` (sparse or dense, whichever
    is smaller), plus the float32 per-channel scales when ``quantize="int8"``.

    Args:
        t: the weight (an already-int8 weight counts one byte per value; its scales are
            a separate tensor).
        quantize: None or ``"int8"``.
        nnz: number of non-zeros, if already known.
        transposed: ``t`` is stored ``(in, out)`` (HF ``Conv1D``); an int8 layer is written
            ``(out, in)``, so its bitmask rows are ``t``'s columns.

    Returns:
        The byte count.
    """
    _check_quantize(quantize)
    if nnz is None:
        nnz = int(torch.count_nonzero(t))
    if t.dim() == 3:  # fused experts are never quantized by the exporter
        quantize = None
    if quantize == "int8" and t.dtype != torch.int8:
        q = t.t() if transposed and t.dim() == 2 else t  # only its shape is used
        vb = 1
        body = (
            sparse_tensor_bytes(q, value_bytes=1, nnz=nnz) if stores_sparse(q, quantize="int8", nnz=nnz) else q.numel()
        )
        return body + SCALE_BYTES * _rows_cols(q.shape)[0]
    vb = 1 if t.dtype == torch.int8 else t.element_size()
    return (
        sparse_tensor_bytes(t, value_bytes=vb, nnz=nnz)
        if stores_sparse(t, quantize=quantize, nnz=nnz)
        else t.numel() * vb
    )


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
    quantize: Optional[str] = None,
    nnz: Optional[dict[int, int]] = None,
    transposed: Optional[Iterable[Tensor]] = None,
) -> int:
    """Bytes ``artemis.save_pruned`` writes for ``model`` when ``sparse_params`` are the
    candidate weights (each stored sparse when that is smaller, int8 when ``quantize="int8"``).

    Args:
        sparse_params: the candidate weights (by identity).
        quantize: None or ``"int8"``.
        nnz: optional ``id(tensor) -> non-zero count`` to avoid counting again.
        transposed: the candidates stored ``(in, out)`` (HF ``Conv1D``).

    Returns:
        The byte count (tensor bytes; headers and JSON files are not counted).
    """
    _check_quantize(quantize)
    sparse_ids = {id(p) for p in sparse_params}
    transposed_ids = {id(p) for p in (transposed or ())}
    total = 0
    for _, t in unique_state_tensors(model):
        if id(t) in sparse_ids:
            total += stored_weight_bytes(
                t,
                quantize=quantize,
                nnz=None if nnz is None else nnz.get(id(t)),
                transposed=id(t) in transposed_ids,
            )
        else:
            total += dense_tensor_bytes(t)
    return total


def layer_row(name: str, param: torch.Tensor, zeros: int) -> dict:
    """One row of a summary's per-layer table: name, shape, size, zeros and sparsity.

    Example:
        >>> import torch
        >>> layer_row("fc", torch.zeros(2, 4), 6)
        {'name': 'fc', 'shape': [2, 4], 'numel': 8, 'zeros': 6, 'sparsity': 0.75}
    """
    numel = param.numel()
    return {
        "name": name,
        "shape": list(param.shape),
        "numel": numel,
        "zeros": zeros,
        "sparsity": zeros / numel if numel else 0.0,
    }
