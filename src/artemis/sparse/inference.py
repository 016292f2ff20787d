"""Sparse inference: a drop-in ``nn.Linear`` replacement that runs a sparse kernel where it
is faster, chosen per layer by measurement.

Unstructured sparsity only saves time when a kernel skips the zeros. On CPU,
:class:`SparseLinear` has two kernels:

* ``bitmask`` (x86 CPUs with AVX-512, or AVX2 + FMA): the weight is kept as its non-zero
  values plus one bit per weight (uint16 masks of 16 inputs), 1.325 bytes per weight at
  70% sparsity instead of 4 dense, and multiplied by :mod:`artemis.sparse.kernels`' compiled
  kernel, which expands 16 values at a time (``vexpandps``; with AVX2 a masked load and
  a table-driven ``vpermps`` per 8) and prefetches the value stream. Its rows are split
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
parameter). An input that needs a gradient still gets one (the ``bitmask`` backward
decodes the weight to dense for it), so a model called without ``torch.no_grad()``
works, only more slowly. Save the pruned dense model (or its compressed export) and
sparsify after loading.

Example:
    >>> import torch, torch.nn as nn
    >>> from artemis.sparse.inference import SparseLinear
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

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from artemis.core.targets import conv1d_class, match_pattern
from artemis.sparse import kernels

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
        backend: ``csr`` (CPU, float32/float64), ``bitmask`` (CPU with AVX-512 or AVX2, float32;
            see :func:`artemis.sparse.kernels.kernel_status`) or ``semi_structured`` (CUDA, 2:4,
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
                raise ValueError(f"backend 'csr' runs on CPU with float32/float64 weights; got {w.dtype} on {w.device}")
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
            if bias is not None and tuple(bias.shape) != (self.out_features,):
                raise ValueError(f"bias has shape {tuple(bias.shape)}; expected ({self.out_features},)")
            b = torch.zeros(self.out_features, dtype=torch.float32) if bias is None else bias.detach().float().clone()
            self.register_buffer("bias_f32", b.contiguous(), persistent=False)

    def _init_bitmask(self, w: Tensor) -> None:
        # the export's sparse-bitmask layout, with the columns padded to 16 so that each
        # row's bits read as uint16 masks of 16 inputs (bit j of mask c = input 16c + j)
        from artemis.sparse.bitmask import bitmask_compress

        rows, cols = w.shape
        self.chunks = -(-cols // 16)
        parts = bitmask_compress(F.pad(w, (0, self.chunks * 16 - cols)))
        self.register_buffer("masks", parts["bitmask"].view(torch.int16), persistent=False)
        self.register_buffer("values", parts["compressed"], persistent=False)
        self.register_buffer("row_offsets", parts["row_offsets"], persistent=False)

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

    def _bitmask_operands(self) -> tuple[int, int, int, int]:
        """Addresses of the kernel's four buffers, read at every call (a deep copy, a
        ``.to()`` or an assignment replaces them), after checking what the kernel assumes;
        the checks are redone whenever an address or dtype differs from the last call."""
        bufs = self._buffers
        m, v, o, bias = bufs["masks"], bufs["values"], bufs["row_offsets"], bufs["bias_f32"]
        key = (m.data_ptr(), v.data_ptr(), o.data_ptr(), bias.data_ptr(), m.dtype, v.dtype, o.dtype, bias.dtype)
        if key == self.__dict__.get("_checked_key"):
            return key[:4]
        ok = (
            m.dtype == torch.int16
            and v.dtype == torch.float32
            and o.dtype == torch.int64
            and bias.dtype == torch.float32
            and all(t.device.type == "cpu" and t.is_contiguous() for t in (m, v, o, bias))
            and tuple(m.shape) == (self.out_features, self.chunks)
            and tuple(o.shape) == (self.out_features,)
            and tuple(bias.shape) == (self.out_features,)
            and v.dim() == 1
            and v.numel() == self.nnz
        )
        if not ok:
            raise RuntimeError(
                "SparseLinear(backend='bitmask') runs on CPU with its buffers as built (int16 masks, float32 values "
                f"and bias, int64 row_offsets); got masks {m.dtype}{tuple(m.shape)} on {m.device}, values {v.dtype} on "
                f"{v.device}, row_offsets {o.dtype}, bias {bias.dtype}{tuple(bias.shape)}"
            )
        self.__dict__["_checked_key"] = key
        return key[:4]

    def _bitmask_forward(self, x: Tensor) -> Tensor:
        if x.device.type != "cpu":
            raise RuntimeError(f"SparseLinear(backend='bitmask') runs on CPU; the input is on {x.device}")
        if x.requires_grad and torch.is_grad_enabled():
            return _BitmaskGrad.apply(x, self)
        return self._bitmask_product(x)

    def _bitmask_product(self, x: Tensor) -> Tensor:
        masks, values, offsets, bias = self._bitmask_operands()
        x2 = x.reshape(-1, self.in_features)  # no graph here: under no_grad, or inside _BitmaskGrad
        if x2.dtype != torch.float32:
            x2 = x2.float()
        pad = self.chunks * 16 - self.in_features
        x2 = F.pad(x2, (0, pad)) if pad else x2.contiguous()
        batch = x2.shape[0]
        out = torch.empty(batch, self.out_features, dtype=torch.float32)
        kernels.matvec(
            masks,
            self.chunks,
            values,
            offsets,
            x2.data_ptr(),
            x2.shape[1],
            bias,
            out.data_ptr(),
            self.out_features,
            batch,
            self.out_features,
            threads=torch.get_num_threads(),
        )
        return out if x.dtype == torch.float32 else out.to(x.dtype)

    def dense_weight(self) -> Tensor:
        """The weight as a dense ``(out_features, in_features)`` tensor (a new copy)."""
        if self.backend != "bitmask":
            return self.weight.to_dense() if self.weight.layout != torch.strided else self.weight.clone()
        from artemis.sparse.bitmask import bitmask_decompress

        parts = {
            "compressed": self.values,
            "bitmask": self.masks.view(torch.uint8),
            "row_offsets": self.row_offsets,
            "shape": torch.tensor([self.out_features, self.chunks * 16]),
        }
        return bitmask_decompress(parts, name="SparseLinear.weight")[:, : self.in_features].contiguous()

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, backend={self.backend}, "
            f"sparsity={self.sparsity:.3f}"
        )


class _BitmaskGrad(torch.autograd.Function):
    """The bitmask product for an input that needs a gradient: the kernel forward, and
    ``grad_x = grad_y · W`` with ``W`` decoded to dense for the backward pass (the weight
    itself is a buffer and gets no gradient)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, module: "SparseLinear") -> Tensor:
        ctx.module = module
        ctx.x_dtype = x.dtype
        return module._bitmask_product(x)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        w = ctx.module.dense_weight()
        return (grad.to(w.dtype) @ w).to(ctx.x_dtype), None


CLOCKS = {"wall": time.perf_counter, "cpu": time.thread_time}


def time_call(fn: Callable[[], Any], *, repeats: int = 20, warmup: int = 3, clock: str = "wall") -> float:
    """Median seconds of ``fn()`` over ``repeats`` calls after ``warmup`` calls.

    ``clock="cpu"`` measures the calling thread's CPU time (``time.thread_time``): with
    one torch thread it is the work done, robust to other processes sharing the cores.

    Example (a clock that moves only when the timed function runs, so the result is exact):
        >>> now = [0.0]
        >>> CLOCKS["demo"] = lambda: now[0]
        >>> def work():
        ...     now[0] += 0.25
        >>> time_call(work, repeats=5, warmup=2, clock="demo")
        0.25
        >>> now[0]  # fn is timed against itself: 2 x (2 warm-up + 5 timed) calls of 0.25
        3.5
        >>> del CLOCKS["demo"]
    """
    return time_pair(fn, fn, repeats=repeats, warmup=warmup, clock=clock)[0]


def time_pair(
    a: Callable[[], Any], b: Callable[[], Any], *, repeats: int = 20, warmup: int = 3, clock: str = "wall"
) -> tuple[float, float]:
    """Median seconds of ``a()`` and of ``b()``, timed alternately (so that a load change
    on a shared machine hits both alike).

    Example (a clock that moves only when ``a`` or ``b`` runs; the median is the middle
    of the sorted times, the upper one of the two middles for an even ``repeats``):
        >>> now, log = [0.0], []
        >>> CLOCKS["demo"] = lambda: now[0]
        >>> costs = iter([9.0, 1.0, 7.0, 2.0, 3.0])  # a's calls: one warm-up, then 4 timed
        >>> def a():
        ...     log.append("a")
        ...     now[0] += next(costs)
        >>> def b():
        ...     log.append("b")
        ...     now[0] += 0.5
        >>> time_pair(a, b, repeats=4, warmup=1, clock="demo")
        (3.0, 0.5)
        >>> "".join(log)  # taken in turns
        'ababababab'
        >>> del CLOCKS["demo"]
        >>> time_pair(a, b, clock="gpu")
        Traceback (most recent call last):
        ...
        ValueError: unknown clock 'gpu'; valid: 'wall', 'cpu'
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
    return _median(ta), _median(tb)


def _median(v: list[float]) -> float:
    return sorted(v)[len(v) // 2]


WINDOW_BYTES = 256 << 20  # sparsify_for_inference: dense weight bytes timed together (more than a CPU cache)


def _measure_window(
    model: nn.Module,
    window: list[tuple[str, nn.Module]],
    report: dict[str, dict[str, Any]],
    backend: str,
    batch_size: int,
    min_speedup: float,
    repeats: int,
    clock: str,
) -> None:
    """Build, time and choose for the layers of one window (see :func:`sparsify_for_inference`)."""
    built: dict[str, dict[str, SparseLinear]] = {}
    for name, module in window:
        w = module.weight
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
            report[name]["choice"] = f"dense ({'; '.join(errors)})"
    modules = dict(window)
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

    for name, variants in built.items():
        entry = report[name]
        dense_t = _median(times[(name, "dense")])
        sparse_ts = {kind: _median(times[(name, kind)]) for kind in variants}
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
        backend: ``auto`` (default: on CPU, ``bitmask`` where :mod:`artemis.sparse.kernels` can
            run it and ``csr``, the faster per layer; on CUDA, ``semi_structured``), or one
            of ``bitmask``, ``csr``, ``semi_structured``.
        min_sparsity: layers less sparse than this are not measured (stay dense).
        min_speedup: required dense/sparse time ratio to switch (0 forces every measured layer sparse).
        patterns: module-name globs (or ``re:`` regexes) to consider; default all.
        repeats: timed calls per layer and kernel (median). Layers are timed in turn,
            round after round, in windows of ``WINDOW_BYTES`` (256 MiB) of dense weights,
            so that each layer's weights leave the caches between its calls, as in a
            forward pass of a model larger than the caches; only one window's sparse
            variants exist at a time.
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
    # Layers are measured in windows of about WINDOW_BYTES of dense weights: the window's
    # sparse variants are built, every layer of the window is timed in turn, round after
    # round, and only the winners are kept. Between two calls of one layer the others run,
    # so (when the window is larger than the caches, as a model is) each layer's weights
    # come from memory, as in a forward pass; timing one layer in a loop keeps its dense
    # weight in cache and favours dense. The window bounds the extra memory of the variants.
    window: list[tuple[str, nn.Module]] = []
    window_bytes = 0
    for i, (name, module) in enumerate(candidates):
        w = module.weight
        sparsity = 1.0 - int(torch.count_nonzero(w)) / w.numel()
        report[name] = {"sparsity": round(sparsity, 4)}
        if sparsity < min_sparsity:
            report[name]["choice"] = f"dense (sparsity below {min_sparsity})"
        else:
            window.append((name, module))
            window_bytes += w.numel() * w.element_size()
        if window and (window_bytes >= WINDOW_BYTES or i == len(candidates) - 1):
            _measure_window(model, window, report, backend, batch_size, min_speedup, repeats, clock)
            window, window_bytes = [], 0
    n_sparse = sum(1 for e in report.values() if e.get("choice") == "sparse")
    logger.info("sparsify_for_inference: %d of %d linear layers use the sparse kernel", n_sparse, len(report))
    return report
