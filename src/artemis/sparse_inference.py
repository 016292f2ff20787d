"""Sparse inference: a drop-in ``nn.Linear`` replacement that runs a sparse kernel where it
is faster, chosen per layer by measurement.

Unstructured sparsity only saves time when a kernel skips the zeros. On CPU,
:class:`SparseLinear` has two kernels:

* ``bitmask`` (CPUs with AVX-512): the weight is kept as its non-zero values plus one bit
  per weight (uint16 masks of 16 inputs), 1.325 bytes per weight at 70% sparsity instead
  of 4 dense, and multiplied by :mod:`artemis.kernels`' compiled kernel, which expands 16
  values at a time with ``vexpandps`` and prefetches the value stream. Its rows are split
  over Numba's thread pool when Numba is installed (``torch.get_num_threads()`` threads).
  This is the kernel that makes batch-1 decoding faster: decode-time products are
  matrix × few-vectors and memory-bound, so reading 3× fewer bytes pays;
* ``csr``: PyTorch's CSR layout with **int32** indices (8 bytes per kept weight) and
  ``torch.mv``/``torch.sparse.mm`` (MKL's sparse BLAS in the x86 builds), which gains at
  a few tokens per call but little at one.

At large batches the dense GEMM wins. :func:`sparsify_for_inference` therefore times
dense and every available sparse kernel on each layer, at the batch size you will run,
when the model is loaded, and replaces a layer only where the fastest sparse kernel beats
dense by a margin (dense fallback everywhere else); it returns the measurements.

On CUDA, ``backend="semi_structured"`` stores a 2:4-sparse half/bfloat16 weight with
``torch.sparse.to_sparse_semi_structured`` (cuSPARSELt/CUTLASS kernels), the only
unstructured-like pattern GPUs accelerate.

The replaced modules are for inference: their weight is a buffer (not a trainable
parameter), and the ``bitmask`` kernel refuses inputs that need a gradient. Save the
pruned dense model (or its compressed export) and sparsify after loading.

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

import functools
import logging
import time
import warnings
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from artemis import kernels
from artemis.targets import conv1d_class, match_pattern

__all__ = ["SparseLinear", "sparsify_for_inference", "time_call", "time_pair", "BACKENDS", "CLOCKS"]

logger = logging.getLogger(__name__)

BACKENDS = ("bitmask", "csr", "semi_structured")
CHOICES = ("auto",) + BACKENDS


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
        backend: ``csr`` (CPU, float32/float64), ``bitmask`` (CPU with AVX-512, float32;
            see :func:`artemis.kernels.kernel_status`) or ``semi_structured`` (CUDA, 2:4,
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
        elif backend == "bitmask":
            if w.device.type != "cpu" or w.dtype != torch.float32:
                raise ValueError(f"backend 'bitmask' runs on CPU with float32 weights; got {w.dtype} on {w.device}")
            if not kernels.matvec_ready():
                raise ValueError(
                    f"backend 'bitmask' is not available here: {kernels.kernel_status()['reason']}; use backend='csr'"
                )
            self._init_bitmask(w)
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
        if backend == "bitmask":  # the kernel adds a float32 bias vector, zeros when there is none
            b = torch.zeros(self.out_features) if bias is None else bias.detach().float().clone()
            self.register_buffer("bias_f32", b.contiguous(), persistent=False)

    def _init_bitmask(self, w: Tensor) -> None:
        rows, cols = w.shape
        self.chunks = -(-cols // 16)
        nz = (w != 0).numpy()
        padded = np.zeros((rows, self.chunks * 16), dtype=np.bool_)
        padded[:, :cols] = nz
        masks = np.packbits(padded, axis=1, bitorder="little").view(np.int16)  # bit j of mask c = input 16c+j
        counts = nz.sum(axis=1, dtype=np.int64)
        self.register_buffer("masks", torch.from_numpy(np.ascontiguousarray(masks)), persistent=False)
        self.register_buffer("values", w.contiguous()[torch.from_numpy(nz)].contiguous(), persistent=False)
        self.register_buffer("row_offsets", torch.from_numpy(np.cumsum(counts) - counts), persistent=False)

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
        if self.backend == "bitmask":
            return self._bitmask_forward(x).reshape(*lead, self.out_features)
        if x.numel() == self.in_features:  # one token: sparse matrix × vector, few Python steps
            v = x.reshape(-1).to(self.weight.dtype)
            y = torch.mv(self.weight, v) if self.bias is None else torch.addmv(self.bias, self.weight, v)
            return y.to(x.dtype).reshape(*lead, self.out_features)
        x2 = x.reshape(-1, self.in_features).to(self.weight.dtype)  # (tokens, in)
        y = torch.sparse.mm(self.weight, x2.t()).t()  # (tokens, out)
        if self.bias is not None:
            y = y + self.bias
        return y.to(x.dtype).reshape(*lead, self.out_features)

    def _apply(self, fn, recurse=True):  # .to()/.cpu()/.float() replace the buffers: re-read their addresses
        out = super()._apply(fn, recurse)
        self._ptrs = None
        return out

    def _bitmask_forward(self, x: Tensor) -> Tensor:
        if x.requires_grad and torch.is_grad_enabled():
            raise RuntimeError("SparseLinear(backend='bitmask') is for inference: its kernel computes no gradient")
        ptrs = getattr(self, "_ptrs", None)
        if ptrs is None:
            if self.values.device.type != "cpu" or self.values.dtype != torch.float32:
                raise RuntimeError(
                    f"SparseLinear(backend='bitmask') runs on CPU in float32; its weight is {self.values.dtype} "
                    f"on {self.values.device}"
                )
            ptrs = self._ptrs = (self.masks.data_ptr(), self.values.data_ptr(), self.row_offsets.data_ptr(),
                                 self.bias_f32.data_ptr())
        if x.device.type != "cpu":
            raise RuntimeError(f"SparseLinear(backend='bitmask') runs on CPU; the input is on {x.device}")
        x2 = x.reshape(-1, self.in_features)
        if x2.dtype != torch.float32:
            x2 = x2.float()
        pad = self.chunks * 16 - self.in_features
        x2 = F.pad(x2, (0, pad)) if pad else x2.contiguous()
        batch = x2.shape[0]
        out = torch.empty(batch, self.out_features)
        masks, values, offsets, bias = ptrs
        kernels.matvec(masks, self.chunks, values, offsets, x2.data_ptr(), x2.shape[1], bias, out.data_ptr(),
                       self.out_features, batch, self.out_features, threads=torch.get_num_threads())
        return out if x.dtype == torch.float32 else out.to(x.dtype)

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
    backend: str = "auto",
    min_sparsity: float = 0.5,
    min_speedup: float = 1.1,
    patterns: Optional[Sequence[str]] = None,
    repeats: int = 20,
    clock: str = "wall",
) -> dict[str, dict[str, Any]]:
    """Replace each sufficiently sparse linear layer by :class:`SparseLinear` where measured faster.

    For every ``nn.Linear``/``Conv1D`` (matching ``patterns`` when given) whose weight has at
    least ``min_sparsity`` zeros, time the dense product and each candidate sparse kernel
    on a random input of ``batch_size`` rows (the tokens per call you will run: 1 for
    decoding one sequence), and swap the module for a ``SparseLinear`` with the fastest
    kernel only when it is at least ``min_speedup`` times faster than dense. Other layers
    stay dense (the fallback).

    Args:
        model: the (pruned) model; changed in place.
        batch_size: rows per call to measure at (decode batch size).
        backend: ``auto`` (default: on CPU, ``bitmask`` where :mod:`artemis.kernels` can
            run it and ``csr``, the faster per layer; on CUDA, ``semi_structured``), or one
            of ``bitmask``, ``csr``, ``semi_structured``.
        min_sparsity: layers less sparse than this are not measured (stay dense).
        min_speedup: required dense/sparse time ratio to switch (0 forces every measured layer sparse).
        patterns: module-name globs (or ``re:`` regexes) to consider; default all.
        repeats: timed calls per layer and kernel (median). Layers are timed in turn,
            round after round, so that each layer's weights leave the caches between its
            calls, as in a forward pass of a model larger than the caches.
        clock: ``wall`` (default) or ``cpu`` (the thread's CPU time; use it with one torch
            thread on a machine shared with other jobs).

    Returns:
        ``{module name: {"sparsity", "dense_us", "<backend>_us" for each kernel timed,
        "backend" (the fastest), "sparse_us" (its time), "speedup", "choice"}}`` with
        ``choice`` ``"sparse"``, ``"dense"`` or ``"dense (reason)"``.

    Raises:
        ValueError: bad arguments.
    """
    if backend not in CHOICES:
        raise ValueError(f"unknown sparse backend {backend!r}; valid: {', '.join(map(repr, CHOICES))}")
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
    built: dict[str, dict[str, SparseLinear]] = {}
    for name, module in candidates:
        w = module.weight
        sparsity = 1.0 - int(torch.count_nonzero(w)) / w.numel()
        entry: dict[str, Any] = {"sparsity": round(sparsity, 4)}
        report[name] = entry
        if sparsity < min_sparsity:
            entry["choice"] = f"dense (sparsity below {min_sparsity})"
            continue
        if backend != "auto":
            kinds = [backend]
        elif w.device.type == "cuda":
            kinds = ["semi_structured"]
        else:
            kinds = (["bitmask"] if kernels.matvec_ready() else []) + ["csr"]
        errors = []
        for kind in kinds:
            try:
                built.setdefault(name, {})[kind] = SparseLinear.from_linear(module, kind)
            except ValueError as exc:
                errors.append(str(exc))
        if name not in built:
            entry["choice"] = f"dense ({'; '.join(errors)})"

    # Time every layer in turn, round after round: between two calls of one layer all the
    # others run, so (in a model larger than the caches) each layer's weights come from
    # memory, as they do in a forward pass. Timing one layer in a loop would keep its
    # dense weight in cache and favour dense.
    modules = dict(candidates)
    now = CLOCKS[clock]
    calls: list[tuple[str, str, Callable[[], Any]]] = []
    for name, variants in built.items():
        w = modules[name].weight
        x = torch.randn(batch_size, next(iter(variants.values())).in_features, dtype=w.dtype, device=w.device)
        for kind, mod in [("dense", modules[name]), *variants.items()]:
            calls.append((name, kind, functools.partial(mod, x)))
    sync = torch.cuda.synchronize if any(modules[n].weight.is_cuda for n in built) else (lambda: None)
    times: dict[tuple[str, str], list[float]] = {(n, k): [] for n, k, _ in calls}
    for rnd in range(2 + repeats):  # two warm-up rounds
        for name, kind, call in calls:
            t0 = now()
            call()
            sync()
            if rnd >= 2:
                times[(name, kind)].append(now() - t0)

    def median(v: list[float]) -> float:
        v = sorted(v)
        return v[len(v) // 2]

    for name, variants in built.items():
        entry = report[name]
        dense_t = median(times[(name, "dense")])
        sparse_ts = {kind: median(times[(name, kind)]) for kind in variants}
        for kind, t in sparse_ts.items():
            entry[f"{kind}_us"] = round(t * 1e6, 1)
        best = min(sparse_ts, key=sparse_ts.get)
        sparse_t = sparse_ts[best]
        entry.update(
            dense_us=round(dense_t * 1e6, 1),
            backend=best,
            sparse_us=round(sparse_t * 1e6, 1),
            speedup=round(dense_t / sparse_t, 3) if sparse_t > 0 else float("inf"),
        )
        if dense_t >= min_speedup * sparse_t:
            parent, attr = _parent(model, name)
            setattr(parent, attr, variants[best])
            entry["choice"] = "sparse"
        else:
            entry["choice"] = "dense"
    n_sparse = sum(1 for e in report.values() if e.get("choice") == "sparse")
    logger.info("sparsify_for_inference: %d of %d linear layers use the sparse kernel", n_sparse, len(report))
    return report
