"""Sparse formats and what reads them: :mod:`~artemis.sparse.bitmask` (the sparse-bitmask
codec), :mod:`~artemis.sparse.checkpoint` (``save_pruned`` / ``load_pruned``),
:mod:`~artemis.sparse.quantization` (int8 that keeps every zero, QAT),
:mod:`~artemis.sparse.inference` (``SparseLinear``, the sparse CPU path) and
:mod:`~artemis.sparse.kernels` (compiled AVX-512/AVX2 kernels, built from the LLVM IR of
``_bitmask_ir``).

Nothing is re-exported here: importing the codec does not load the checkpoint code.

Example:
    >>> import torch
    >>> from artemis.sparse.bitmask import bitmask_compress
    >>> bitmask_compress(torch.tensor([[0.0, 1.5]]))["compressed"].tolist()
    [1.5]
"""

__all__: list[str] = []
