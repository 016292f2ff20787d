"""Sparse inference: a drop-in ``nn.Linear`` replacement that runs a sparse kernel where it
is faster, chosen per layer by measurement.

Unstructured sparsity only saves time when a kernel skips the zeros. On CPU,
:class:`SparseLinear` stores the weight in PyTorch's CSR layout with **int32** indices
(8 bytes per kept weight instead of 4 per weight dense, so the bytes read fall below
dense once more than half the weights are zero) and multiplies with ``torch.mv`` for a
single token and ``torch.sparse.mm`` otherwise (MKL's sparse BLAS in the x86 builds). Decode-time products are
matrix × few-vectors and memory-bound, which is where this can pay off; at large batches
the dense GEMM wins. :func:`sparsify_for_inference` therefore times dense and sparse on
each layer, at the batch size you will run, when the model is loaded, and replaces a
layer only where the sparse kernel is faster by a margin (dense fallback everywhere
else); it returns the measurements.

On CUDA, ``backend="semi_structured"`` stores a 2:4-sparse half/bfloat16 weight with
``torch.sparse.to_sparse_semi_structured`` (cuSPARSELt/CUTLASS kernels), the only
unstructured-like pattern GPUs accelerate.

The replaced modules are for inference: their weight is a buffer (not a trainable
parameter). Save the pruned dense model (or its compressed export) and sparsify after
loading.

Example:
    >>> import torch, torch.nn as nn
    >>> from artemis.sparse_inference import SparseLinear
    >>> lin = nn.Linear(8, 4)
    >>> with torch.no_grad():
    ...     lin.weight[:, ::2] = 0
    >>> sp = SparseLinear.from_linear(lin)
    >>> x = torch.randn(3, 8)
    >>> torch.allclose(sp(x), lin(x), atol=1e-6), sp.nnz
    (True, 16)
"""

from __future__ import annotations

import logging
import time
import warnings
from typing import Any, Callable, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from artemis.targets import conv1d_class, match_pattern

__all__ = ["SparseLinear", "sparsify_for_inference", "time_call", "time_pair", "BACKENDS", "CLOCKS"]

logger = logging.getLogger(__name__)

BACKENDS = ("csr", "semi_structured")


def _to_csr_int32(w: Tensor) -> Tensor:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "sparse CSR support is in beta"
        csr = w.to_sparse_csr()
        return torch.sparse_csr_tensor(
            csr.crow_indices().to(torch.int32),
            csr.col_indices().to(torch.int32),
            csr.values(),
            size=csr.shape,
            check_invariants=False,
        )


class SparseLinear(nn.Module):
    """``y = x Wᵀ + b`` with ``W`` stored sparse; a drop-in for ``nn.Linear`` at inference.

    Args:
        weight: dense ``(out_features, in_features)`` weight (zeros are dropped).
        bias: optional ``(out_features,)``.
        backend: ``csr`` (CPU, float32/float64) or ``semi_structured`` (CUDA, 2:4,
            float16/bfloat16).

    Raises:
        ValueError: a backend the weight's device, dtype or pattern cannot use.
    """

    def __init__(self, weight: Tensor, bias: Optional[Tensor] = None, backend: str = "csr") -> None:
        super().__init__()
        if backend not in BACKENDS:
            raise ValueError(f"unknown sparse backend {backend!r}; valid: {', '.join(map(repr, BACKENDS))}")
        if weight.dim() != 2:
            raise ValueError(f"SparseLinear needs a 2-D weight, got shape {tuple(weight.shape)}")
        self.in_features = weight.shape[1]
        self.out_features = weight.shape[0]
        self.backend = backend
        w = weight.detach()
        self.nnz = int(torch.count_nonzero(w))
        if backend == "csr":
            if w.device.type != "cpu" or w.dtype not in (torch.float32, torch.float64):
                raise ValueError(
                    f"backend 'csr' runs on CPU with float32/float64 weights; got {w.dtype} on {w.device}"
                )
            self.register_buffer("weight", _to_csr_int32(w.contiguous()), persistent=False)
        else:
            if w.device.type != "cuda" or w.dtype not in (torch.float16, torch.bfloat16):
                raise ValueError(
                    "backend 'semi_structured' needs a CUDA float16/bfloat16 weight (2:4 sparse); "
                    f"got {w.dtype} on {w.device}"
                )
            groups = (w.reshape(w.shape[0], -1, 4) != 0).sum(-1) if w.shape[1] % 4 == 0 else None
            if groups is None or bool((groups > 2).any()):
                raise ValueError("backend 'semi_structured' needs a 2:4 weight (at most 2 nonzeros in every 4 inputs)")
            from torch.sparse import to_sparse_semi_structured

            self.register_buffer("weight", to_sparse_semi_structured(w.contiguous()), persistent=False)
        if bias is not None:
            self.register_buffer("bias", bias.detach().clone(), persistent=False)
        else:
            self.bias = None

    @classmethod
    def from_linear(cls, module: nn.Module, backend: str = "csr") -> "SparseLinear":
        """From an ``nn.Linear`` (or Hugging Face ``Conv1D``, whose weight is ``(in, out)``)."""
        conv = conv1d_class()
        if conv is not None and isinstance(module, conv):
            return cls(module.weight.detach().t(), module.bias, backend)
        if not isinstance(module, nn.Linear):
            raise TypeError(f"SparseLinear.from_linear needs nn.Linear or Conv1D, got {type(module).__name__}")
        return cls(module.weight, module.bias, backend)

    @property
    def sparsity(self) -> float:
        return 1.0 - self.nnz / (self.in_features * self.out_features)

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"SparseLinear expects {self.in_features} input features, got shape {tuple(x.shape)}")
        if self.backend == "semi_structured":
            return F.linear(x, self.weight, self.bias)
        lead = x.shape[:-1]
        if x.numel() == self.in_features:  # one token: sparse matrix × vector, few Python steps
            v = x.reshape(-1).to(self.weight.dtype)
            y = torch.mv(self.weight, v) if self.bias is None else torch.addmv(self.bias, self.weight, v)
            return y.to(x.dtype).reshape(*lead, self.out_features)
        x2 = x.reshape(-1, self.in_features).to(self.weight.dtype)  # (tokens, in)
        y = torch.sparse.mm(self.weight, x2.t()).t()  # (tokens, out)
        if self.bias is not None:
            y = y + self.bias
        return y.to(x.dtype).reshape(*lead, self.out_features)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, backend={self.backend}, "
            f"sparsity={self.sparsity:.3f}"
        )


CLOCKS = {"wall": time.perf_counter, "cpu": time.thread_time}


def time_call(fn: Callable[[], Any], *, repeats: int = 20, warmup: int = 3, clock: str = "wall") -> float:
    """Median seconds of ``fn()`` over ``repeats`` calls after ``warmup`` calls.

    ``clock="cpu"`` measures the calling thread's CPU time (``time.thread_time``): with
    one torch thread it is the work done, robust to other processes sharing the cores.

    Example:
        >>> time_call(lambda: sum(range(10)), repeats=3, warmup=1) >= 0
        True
    """
    return time_pair(fn, fn, repeats=repeats, warmup=warmup, clock=clock)[0]


def time_pair(
    a: Callable[[], Any], b: Callable[[], Any], *, repeats: int = 20, warmup: int = 3, clock: str = "wall"
) -> tuple[float, float]:
    """Median seconds of ``a()`` and of ``b()``, timed alternately (so that a load change
    on a shared machine hits both alike).

    Example:
        >>> ta, tb = time_pair(lambda: None, lambda: sum(range(100)), repeats=3)
        >>> ta >= 0 and tb >= 0
        True
    """
    if clock not in CLOCKS:
        raise ValueError(f"unknown clock {clock!r}; valid: {', '.join(map(repr, CLOCKS))}")
    now = CLOCKS[clock]
    for _ in range(warmup):
        a()
        b()
    ta, tb = [], []
    for _ in range(repeats):
        t0 = now()
        a()
        t1 = now()
        b()
        t2 = now()
        ta.append(t1 - t0)
        tb.append(t2 - t1)
    ta.sort()
    tb.sort()
    return ta[len(ta) // 2], tb[len(tb) // 2]


def _parent(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    parts = name.split(".")
    mod = model
    for p in parts[:-1]:
        mod = getattr(mod, p)
    return mod, parts[-1]


@torch.no_grad()
def sparsify_for_inference(
    model: nn.Module,
    *,
    batch_size: int = 1,
    backend: str = "csr",
    min_sparsity: float = 0.5,
    min_speedup: float = 1.1,
    patterns: Optional[Sequence[str]] = None,
    repeats: int = 20,
    clock: str = "wall",
) -> dict[str, dict[str, Any]]:
    """Replace each sufficiently sparse linear layer by :class:`SparseLinear` where measured faster.

    For every ``nn.Linear``/``Conv1D`` (matching ``patterns`` when given) whose weight has at
    least ``min_sparsity`` zeros, time the dense product and the sparse one on a random
    input of ``batch_size`` rows (the tokens per call you will run: 1 for decoding one
    sequence), and swap the module for a ``SparseLinear`` only when the sparse path is at
    least ``min_speedup`` times faster. Other layers stay dense (the fallback).

    Args:
        model: the (pruned) model; changed in place.
        batch_size: rows per call to measure at (decode batch size).
        backend: ``csr`` (CPU) or ``semi_structured`` (CUDA, 2:4).
        min_sparsity: layers less sparse than this are not measured (stay dense).
        min_speedup: required dense/sparse time ratio to switch (0 forces every measured layer sparse).
        patterns: module-name globs (or ``re:`` regexes) to consider; default all.
        repeats: timed calls per measurement (median; dense and sparse alternate).
        clock: ``wall`` (default) or ``cpu`` (the thread's CPU time; use it with one torch
            thread on a machine shared with other jobs).

    Returns:
        ``{module name: {"sparsity", "dense_us", "sparse_us", "speedup", "choice"}}`` with
        ``choice`` ``"sparse"``, ``"dense"`` or ``"dense (reason)"``.

    Raises:
        ValueError: bad arguments.
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown sparse backend {backend!r}; valid: {', '.join(map(repr, BACKENDS))}")
    if clock not in CLOCKS:
        raise ValueError(f"unknown clock {clock!r}; valid: {', '.join(map(repr, CLOCKS))}")
    if batch_size < 1 or repeats < 1 or not (0.0 <= min_sparsity < 1.0) or min_speedup < 0:
        raise ValueError(
            f"need batch_size >= 1, repeats >= 1, 0 <= min_sparsity < 1, min_speedup >= 0; got "
            f"{batch_size}, {repeats}, {min_sparsity}, {min_speedup}"
        )
    conv = conv1d_class()
    report: dict[str, dict[str, Any]] = {}
    candidates = [
        (n, m)
        for n, m in model.named_modules()
        if (isinstance(m, nn.Linear) or (conv is not None and isinstance(m, conv)))
        and (patterns is None or any(match_pattern(p, n) for p in patterns))
    ]
    for name, module in candidates:
        w = module.weight
        sparsity = 1.0 - int(torch.count_nonzero(w)) / w.numel()
        entry: dict[str, Any] = {"sparsity": round(sparsity, 4)}
        report[name] = entry
        if sparsity < min_sparsity:
            entry["choice"] = f"dense (sparsity below {min_sparsity})"
            continue
        try:
            sparse = SparseLinear.from_linear(module, backend)
        except ValueError as exc:
            entry["choice"] = f"dense ({exc})"
            continue
        in_features = sparse.in_features
        x = torch.randn(batch_size, in_features, dtype=w.dtype, device=w.device)
        sync = torch.cuda.synchronize if w.device.type == "cuda" else (lambda: None)

        def dense_call() -> None:
            module(x)
            sync()

        def sparse_call() -> None:
            sparse(x)
            sync()

        dense_t, sparse_t = time_pair(dense_call, sparse_call, repeats=repeats, clock=clock)
        entry.update(
            dense_us=round(dense_t * 1e6, 1),
            sparse_us=round(sparse_t * 1e6, 1),
            speedup=round(dense_t / sparse_t, 3) if sparse_t > 0 else float("inf"),
        )
        if dense_t >= min_speedup * sparse_t:
            parent, attr = _parent(model, name)
            setattr(parent, attr, sparse)
            entry["choice"] = "sparse"
        else:
            entry["choice"] = "dense"
    n_sparse = sum(1 for e in report.values() if e.get("choice") == "sparse")
    logger.info("sparsify_for_inference: %d of %d linear layers use the sparse kernel", n_sparse, len(report))
    return report
