"""Compiled CPU kernels for weights in the sparse-bitmask layout, and when they are used.

Two operations on a matrix stored as its kept values plus one bit per weight (the
layout of :mod:`artemis.sparse.checkpoint`) are slow in numpy/PyTorch operators:

* **decoding** it back to dense when a checkpoint is loaded (numpy needs an unpacked
  bool mask, an index array and a scatter: about 2 ns per weight);
* **multiplying** it by a vector while generating (PyTorch's CSR kernel gains little at
  batch 1: its 8 bytes per kept weight and its indirect loads cost about what the
  skipped zeros save).

AVX-512 has the instruction both need: ``vexpandps``/``vpexpand{b,w,d}`` reads the next
``popcount(mask)`` packed values and places them in the lanes whose bit is set, a 64-byte
bitmask decode in one instruction. :mod:`artemis.sparse._bitmask_ir` writes the kernels in LLVM
IR around LLVM's portable ``llvm.masked.expandload`` intrinsic, and this module compiles
them for the host CPU with `llvmlite <https://llvmlite.readthedocs.io>`_ (the LLVM binding
that Numba is built on; no C compiler needed; on first use in a process about 35 ms to
import llvmlite and 25 ms to compile).
On CPUs without AVX-512, LLVM turns that intrinsic into a lane-by-lane loop that is
slower than the numpy decoder and than a dense matrix·vector, so the expand kernels are
used only where the host has the instruction; on AVX2 CPUs a second set of kernels
expands 8 lanes at a time with a load of the kept values and a table-driven
``vpermps``/``vpermd`` instead:

======================  ==============================================  =====================
operation               needs                                           otherwise
======================  ==============================================  =====================
decode, 4-byte items    ``avx512f``; else ``avx2`` + ``fma``            numpy decoder
decode, 1/2-byte items  ``avx512vbmi2``; else ``avx2`` + ``fma``        numpy decoder
matrix·vector (fp32)    ``avx512f``; else ``avx2`` + ``fma``            CSR or dense
======================  ==============================================  =====================

The matrix·vector kernel splits its rows over Numba's thread pool when Numba is installed
(``pip install "artemis-prune[fast]"``), and runs on one thread otherwise. Set
``ARTEMIS_KERNELS=0`` to turn the kernels off (the numpy decoder gives bit-identical
weights), or ``ARTEMIS_KERNELS=avx2`` to use the AVX2 kernel on an AVX-512 CPU (to
compare them). :func:`kernel_status` says what this process uses and why.

Example:
    >>> from artemis.sparse.kernels import kernel_status
    >>> sorted(kernel_status())
    ['decode_1byte', 'decode_2byte', 'decode_4byte', 'llvmlite', 'matvec', 'matvec_isa', 'reason']
"""

from __future__ import annotations

import ctypes
import functools
import logging
import os
import threading
from typing import Any, Callable, Optional

import numpy as np

__all__ = ["kernel_status", "decode_ready", "matvec_ready", "decode_rows", "matvec", "ENV_SWITCH"]

logger = logging.getLogger(__name__)

ENV_SWITCH = "ARTEMIS_KERNELS"


_LOCK = threading.Lock()  # one compile, one status, whatever threads ask first


def _status(switch: str) -> dict[str, Any]:
    with _LOCK:
        if switch not in _STATUS:
            _STATUS[switch] = _find_status(switch)
        return _STATUS[switch]


_STATUS: dict[str, dict[str, Any]] = {}


def _find_status(switch: str) -> dict[str, Any]:
    off = {"decode_1byte": False, "decode_2byte": False, "decode_4byte": False, "matvec": False, "matvec_isa": None}
    mode = switch.strip().lower()
    if mode in ("0", "false", "no", "off"):
        return {**off, "llvmlite": None, "reason": f"turned off by {ENV_SWITCH}={switch}"}
    try:
        import llvmlite
        from llvmlite import binding
    except ImportError:
        return {**off, "llvmlite": None, "reason": "llvmlite is not installed (pip install llvmlite)"}
    version = llvmlite.__version__
    try:
        host = dict(binding.get_host_cpu_features().items())
    except Exception as exc:  # llvmlite documents RuntimeError where the host cannot be queried
        return {**off, "llvmlite": version, "reason": f"cannot read the CPU features ({exc})"}
    feats = {name for name, on in host.items() if on}
    if "avx512f" in feats and mode != "avx2":
        isa = "avx512"
        features = ",".join(("+" if on else "-") + name for name, on in host.items())
    elif {"avx2", "fma"} <= feats:
        isa = "avx2"  # also where ARTEMIS_KERNELS=avx2 asks for it on an AVX-512 CPU (to compare)
        features = ",".join(("+" if on and not name.startswith("avx512") else "-") + name for name, on in host.items())
    else:
        return {
            **off,
            "llvmlite": version,
            "reason": "this CPU has neither AVX-512 nor AVX2+FMA: the numpy decoder and the CSR kernel are used",
        }
    narrow = {"avx512bw", "avx512vbmi2"} <= feats
    try:
        _compile(isa, features, narrow)
    except Exception as exc:  # an llvmlite/LLVM that cannot build the IR: fall back, say why
        logger.warning("artemis.sparse.kernels: compiling the bitmask kernels failed (%s); using the fallbacks", exc)
        return {**off, "llvmlite": version, "reason": f"compiling the kernels failed: {exc}"}
    if isa == "avx2":
        return {
            "decode_1byte": True,
            "decode_2byte": True,
            "decode_4byte": True,
            "matvec": True,
            "matvec_isa": "avx2",
            "llvmlite": version,
            "reason": "AVX2 (no AVX-512"
            + (", by ARTEMIS_KERNELS=avx2" if "avx512f" in feats else "")
            + "): 8-lane kernels with vpermps/vpermd",
        }
    return {
        "decode_1byte": True,
        "decode_2byte": True,
        "decode_4byte": True,
        "matvec": True,
        "matvec_isa": "avx512",
        "llvmlite": version,
        "reason": "AVX-512 expand instructions available"
        if narrow
        else "AVX-512 without avx512vbmi2: 1- and 2-byte values decode with the AVX2 method",
    }


def kernel_status() -> dict[str, Any]:
    """Which compiled kernels this process uses (``decode_1byte``/``2byte``/``4byte``,
    ``matvec``), the llvmlite version (``None`` if missing or turned off) and the reason."""
    return dict(_status(os.environ.get(ENV_SWITCH, "1")))


def decode_ready(itemsize: int) -> bool:
    """True when values of ``itemsize`` bytes decode with the compiled kernel."""
    return bool(_status(os.environ.get(ENV_SWITCH, "1")).get(f"decode_{itemsize}byte", False))


def matvec_ready() -> bool:
    """True when the compiled bitmask matrix·vector kernel can run here."""
    return bool(_status(os.environ.get(ENV_SWITCH, "1"))["matvec"])


class _Compiled:
    """The kernels of :mod:`artemis.sparse._bitmask_ir` for one instruction set, JIT-compiled for
    this CPU (about 25 ms)."""

    def __init__(self, isa: str, features: str, narrow_expand: bool = True) -> None:
        from llvmlite import binding as llvm

        from artemis.sparse._bitmask_ir import build_module

        llvm.initialize_native_target()
        llvm.initialize_native_asmprinter()
        self._context = llvm.create_context()  # not LLVM's global one, which Numba may be using
        module = llvm.parse_assembly(str(build_module(isa, narrow_expand)), context=self._context)
        module.verify()
        machine = llvm.Target.from_default_triple().create_target_machine(
            cpu=llvm.get_host_cpu_name(), features=features, opt=3
        )
        self._engine = llvm.create_mcjit_compiler(module, machine)  # owns the machine code
        self._engine.finalize_object()
        i64 = ctypes.c_int64
        self.decode = {
            w: ctypes.CFUNCTYPE(i64, *[i64] * 9)(self._engine.get_function_address(f"decode_w{w}")) for w in (1, 2, 4)
        }
        self.matvec_rows = ctypes.CFUNCTYPE(None, *[i64] * 12)(self._engine.get_function_address(f"matvec_rows_{isa}"))


_KERNELS: dict[str, _Compiled] = {}  # kept for the life of the process: callers hold raw function pointers


def _compile(isa: str, features: str, narrow_expand: bool = True) -> _Compiled:
    """Compile once per instruction set (called under ``_LOCK`` by :func:`_status`)."""
    if isa not in _KERNELS:
        _KERNELS[isa] = _Compiled(isa, features, narrow_expand)
    return _KERNELS[isa]


def _compiled() -> _Compiled:
    status = _status(os.environ.get(ENV_SWITCH, "1"))
    isa = status["matvec_isa"]
    if isa is None:
        raise RuntimeError(f"artemis.sparse.kernels: the compiled kernels are not available ({status['reason']})")
    return _KERNELS[isa]


def decode_rows(
    bits: np.ndarray, vals: np.ndarray, offsets: np.ndarray, cols: int, out: np.ndarray, r0: int, r1: int
) -> int:
    """Decode rows ``r0 .. r1-1`` of a bitmask matrix into the flat ``out``; call only where
    :func:`decode_ready` is true.

    ``bits`` is C-contiguous uint8 ``(rows, ceil(cols/8))`` with no bit set at or beyond
    ``cols`` (the caller checks that); ``vals`` and ``out`` (``rows × cols`` items) are
    C-contiguous with the same item size (1, 2 or 4 bytes); ``offsets`` is int64
    ``(rows,)``. The kernel checks that ``offsets[r0]`` lies in ``[0, vals.size]`` and every
    later row's offset equals the running count, and never reads past ``vals``. Releases
    the GIL, so threads can decode in parallel.

    Returns:
        ``-(r + 1)`` if row ``r`` has a wrong offset or too few values left (nothing
        after it is decoded), else the index after the last value used: ``offsets[r1]``,
        or ``vals.size`` when ``r1`` is the last row, for a consistent matrix.
    """
    rows = bits.shape[0] if bits.ndim == 2 else -1
    ok = (
        bits.ndim == 2
        and bits.dtype == np.uint8
        and bits.flags.c_contiguous
        and bits.shape[1] == -(-cols // 8)
        and offsets.dtype == np.int64
        and offsets.flags.c_contiguous
        and offsets.shape == (rows,)
        and vals.ndim == 1
        and vals.flags.c_contiguous
        and out.flags.c_contiguous
        and vals.itemsize == out.itemsize
        and out.itemsize in (1, 2, 4)
        and out.size >= rows * cols
        and 0 <= r0 < r1 <= rows
        and cols >= 1
    )
    if not ok:
        raise ValueError(
            f"decode_rows: bad operands (bits {bits.dtype}{bits.shape}, vals {vals.dtype}{vals.shape}, offsets "
            f"{offsets.dtype}{offsets.shape}, out {out.dtype}{out.shape}, cols {cols}, rows {r0}..{r1}); need C-contiguous "
            "uint8 bits (rows, ceil(cols/8)), int64 offsets (rows,), vals and out of one item size (1, 2 or 4), "
            "out of rows*cols items and 0 <= r0 < r1 <= rows"
        )
    # the current switch's kernels; else any built (all give the same bits), so that a switch
    # changed between the checks and the decode cannot leave a checked tensor undecoded
    isa = _status(os.environ.get(ENV_SWITCH, "1"))["matvec_isa"]
    compiled = _KERNELS.get(isa) or _KERNELS.get("avx512") or _KERNELS.get("avx2")
    if compiled is None:
        raise RuntimeError(f"artemis.sparse.kernels: no compiled decoder here ({kernel_status()['reason']})")
    return compiled.decode[out.itemsize](
        bits.ctypes.data, bits.shape[1], vals.ctypes.data, vals.size, offsets.ctypes.data, cols, out.ctypes.data, r0, r1
    )


def _parallel_matvec() -> Optional[Callable]:
    isa = _status(os.environ.get(ENV_SWITCH, "1"))["matvec_isa"]
    if isa is None:
        _compiled()  # raises, saying why
    return _parallel_driver(isa)


@functools.lru_cache(maxsize=None)  # two threads racing here compile it twice, which is harmless
def _parallel_driver(isa: str) -> Optional[Callable]:
    """A Numba ``prange`` loop that runs :func:`matvec`'s kernel on row blocks in parallel
    (Numba's thread pool starts a block in microseconds; Python threads took ~70 µs per
    call, more than a layer's product). ``None`` without Numba: one thread then."""
    try:
        import numba
    except ImportError:
        logger.info(
            "artemis.sparse.kernels: numba is not installed; the sparse matrix-vector kernel runs on one thread"
        )
        return None
    kernel = _KERNELS[isa].matvec_rows
    _numba_owner.pid = os.getpid()

    @numba.njit(parallel=True, nogil=True)
    def run(masks, chunks, vals, offsets, x, xstride, bias, out, ostride, batch, rows, blocks):  # pragma: no cover
        for i in numba.prange(blocks):
            kernel(
                masks,
                chunks,
                vals,
                offsets,
                x,
                xstride,
                bias,
                out,
                ostride,
                batch,
                rows * i // blocks,
                rows * (i + 1) // blocks,
            )

    return run


def matvec(
    masks: int,
    chunks: int,
    vals: int,
    offsets: int,
    x: int,
    xstride: int,
    bias: int,
    out: int,
    ostride: int,
    batch: int,
    rows: int,
    threads: int = 1,
) -> None:
    """``out[b, r] = bias[r] + Σ_j W[r, j] · x[b, j]`` for ``b < batch``, ``r < rows``, in float32,
    with ``W`` as uint16 chunk masks ``(rows, chunks)``, float32 values and int64 row
    offsets; arguments are data pointers and strides in items (no checks; call only where
    :func:`matvec_ready` is true). ``x`` rows hold ``16 × chunks`` floats (zero-padded).
    ``threads > 1`` splits the rows over Numba's thread pool when Numba is installed, the
    pool is free and this is the process that started it; otherwise one thread."""
    run = _parallel_matvec() if threads > 1 else None
    # Numba's pool serves one Python thread at a time (its workqueue layer aborts the
    # process on concurrent use) and not a forked child (its OpenMP layer aborts there):
    # any other caller runs the kernel on its own thread
    if run is not None and os.getpid() == _numba_owner.pid and _NUMBA_BUSY.acquire(blocking=False):
        try:
            if threads != getattr(_numba_threads, "asked", 0):
                import numba

                numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
                _numba_threads.asked, _numba_threads.got = threads, numba.get_num_threads()
            run(masks, chunks, vals, offsets, x, xstride, bias, out, ostride, batch, rows, _numba_threads.got)
        finally:
            _NUMBA_BUSY.release()
        return
    _compiled().matvec_rows(masks, chunks, vals, offsets, x, xstride, bias, out, ostride, batch, 0, rows)


class _Owner:
    pid = -1  # the process that built the Numba driver


_numba_owner = _Owner()
_NUMBA_BUSY = threading.Lock()
_numba_threads = threading.local()  # what this thread last gave Numba (its thread count is per calling thread)
