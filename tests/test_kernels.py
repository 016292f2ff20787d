"""The compiled bitmask kernels (artemis.sparse.kernels): decode and matrix-vector, and their fallbacks."""

from __future__ import annotations

import functools
import importlib.util
import logging
import sys

import numpy as np
import pytest
import torch
import torch.nn as nn

from artemis.core.errors import CheckpointError
from artemis.sparse import kernels
from artemis.sparse.checkpoint import bitmask_compress, bitmask_decompress
from artemis.sparse.inference import SparseLinear, sparsify_for_inference

needs_kernels = pytest.mark.skipif(
    not (kernels.decode_ready(2) and kernels.matvec_ready()),
    reason="no compiled bitmask kernels here (they need llvmlite and an AVX-512 or AVX2+FMA CPU): "
    + str(kernels.kernel_status()["reason"]),
)


def _cpu_has(*features: str) -> bool:
    """True when llvmlite is installed and the host CPU has every one of ``features``."""
    try:
        from llvmlite import binding
    except ImportError:
        return False
    feats = binding.get_host_cpu_features()
    return all(bool(feats.get(f)) for f in features)


def _has_avx2() -> bool:
    return _cpu_has("avx2", "fma")


@pytest.fixture(params=["kernel", "avx2", "numpy"])
def decoder(request, monkeypatch):
    """Run a test with the compiled decoder (the host's best, and the AVX2 one) and with the
    numpy fallback (ARTEMIS_KERNELS=0)."""
    if request.param == "numpy":
        monkeypatch.setenv(kernels.ENV_SWITCH, "0")
    elif request.param == "avx2":
        if not _has_avx2():
            pytest.skip("the AVX2 kernels need llvmlite and an AVX2+FMA CPU")
        monkeypatch.setenv(kernels.ENV_SWITCH, "avx2")
        if kernels.kernel_status()["matvec_isa"] != "avx2":
            pytest.skip(f"no AVX2 kernels here: {kernels.kernel_status()['reason']}")
    elif not kernels.decode_ready(2):
        pytest.skip(f"no compiled decoder here: {kernels.kernel_status()['reason']}")
    return request.param


def test_status_names_the_switch(monkeypatch):
    monkeypatch.setenv(kernels.ENV_SWITCH, "0")
    status = kernels.kernel_status()
    assert status == {
        "decode_1byte": False,
        "decode_2byte": False,
        "decode_4byte": False,
        "matvec": False,
        "matvec_isa": None,
        "llvmlite": None,
        "reason": "turned off by ARTEMIS_KERNELS=0",
    }
    assert not kernels.decode_ready(4) and not kernels.matvec_ready()


@needs_kernels
def test_decode_rows_hand_example():
    # 2 x 20 int16 matrix: row 0 keeps columns 1 and 17 (the second in the partial last chunk),
    # row 1 keeps column 0 and 19
    bits = np.zeros((2, 3), dtype=np.uint8)
    bits[0, 0] = 0b10
    bits[0, 2] = 0b10
    bits[1, 0] = 0b1
    bits[1, 2] = 0b1000
    vals = np.array([5, 6, 7, 8], dtype=np.int16)
    out = np.full(40, -1, dtype=np.int16)
    end = kernels.decode_rows(bits, vals, np.array([0, 2], dtype=np.int64), 20, out, 0, 2)
    assert end == 4
    want = np.zeros((2, 20), dtype=np.int16)
    want[0, 1], want[0, 17], want[1, 0], want[1, 19] = 5, 6, 7, 8
    assert np.array_equal(out.reshape(2, 20), want)
    # a block of rows: row 1 alone starts at its offset and ends at the value count
    out2 = np.zeros(40, dtype=np.int16)
    assert kernels.decode_rows(bits, vals, np.array([0, 2], dtype=np.int64), 20, out2, 1, 2) == 4
    assert np.array_equal(out2[20:], want[1])
    # a wrong offset stops at that row: -(row + 1)
    assert kernels.decode_rows(bits, vals, np.array([0, 3], dtype=np.int64), 20, out, 0, 2) == -2
    # too few values: row 1 would read past the end
    assert kernels.decode_rows(bits, vals[:3], np.array([0, 2], dtype=np.int64), 20, out, 0, 2) == -2
    # a first offset outside [0, nvals] (negative, or huge) is caught before anything is read
    for first in (-2, 5, 2**40):
        assert kernels.decode_rows(bits, vals, np.array([first, 2], dtype=np.int64), 20, out, 0, 2) == -1
    with pytest.raises(ValueError, match=r"decode_rows: bad operands .* rows 1\.\.1"):
        kernels.decode_rows(bits, vals, np.array([0, 2], dtype=np.int64), 20, out, 1, 1)
    with pytest.raises(ValueError, match="vals and out of one item size"):
        kernels.decode_rows(bits, vals.view(np.int8), np.array([0, 2], dtype=np.int64), 20, out, 0, 2)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.int8])
@pytest.mark.parametrize("shape", [(5, 37), (3, 100), (7, 8), (2, 1), (4, 64), (3, 65), (6, 130), (9, 512)])
def test_decode_matches_dense_bit_for_bit(decoder, dtype, shape):
    g = torch.Generator().manual_seed(sum(shape))
    w = (torch.randn(shape, generator=g) * 3).to(dtype)
    w[torch.rand(shape, generator=g) < 0.6] = 0
    parts = bitmask_compress(w)
    back = bitmask_decompress(parts)
    assert back.dtype == dtype and torch.equal(back, w)


def test_decode_errors_are_the_same_on_both_paths(decoder):
    w = torch.randn(6, 40)
    w[w.abs() < 0.5] = 0
    parts = bitmask_compress(w)
    bad = dict(parts, row_offsets=parts["row_offsets"].clone())
    bad["row_offsets"][3] += 1
    with pytest.raises(
        CheckpointError, match=r"tensor 'l.weight' in f: l.row_offsets does not match the bitmask's row counts"
    ):
        bitmask_decompress(bad, name="l.weight", file="f")
    short = dict(parts, compressed=parts["compressed"][:-1])
    n = parts["compressed"].numel()
    with pytest.raises(
        CheckpointError, match=rf"the bitmask marks {n} non-zero weights but l.compressed holds {n - 1} values"
    ):
        bitmask_decompress(short, name="l.weight", file="f")
    for first in (-3, 5, 2**40):  # a corrupted first offset, and a layout that skips leading values
        moved = dict(parts, row_offsets=parts["row_offsets"] + first)
        with pytest.raises(CheckpointError, match="l.row_offsets does not match the bitmask's row counts"):
            bitmask_decompress(moved, name="l.weight", file="f")
    padded = dict(
        parts, compressed=torch.cat([torch.ones(5), parts["compressed"]]), row_offsets=parts["row_offsets"] + 5
    )
    with pytest.raises(CheckpointError, match=rf"marks {n} non-zero weights but l.compressed holds {n + 5} values"):
        bitmask_decompress(padded, name="l.weight", file="f")
    empty_rows = {
        "compressed": torch.ones(1),
        "bitmask": torch.zeros(0, 5, dtype=torch.uint8),
        "shape": torch.tensor([0, 40]),
        "row_offsets": torch.zeros(0, dtype=torch.int64),
    }
    with pytest.raises(CheckpointError, match="marks 0 non-zero weights but l.compressed holds 1 values"):
        bitmask_decompress(empty_rows, name="l.weight", file="f")


def _sparse_linear(n_in: int, n_out: int, bias: bool, seed: int = 0) -> nn.Linear:
    torch.manual_seed(seed)
    lin = nn.Linear(n_in, n_out, bias=bias)
    with torch.no_grad():
        lin.weight[torch.rand(n_out, n_in) < 0.7] = 0
    return lin


@needs_kernels
@pytest.mark.parametrize("n_in,n_out,bias", [(37, 5, True), (64, 33, False), (100, 9, True), (16, 1, True)])
@pytest.mark.parametrize("threads", [1, 2])
def test_bitmask_linear_matches_dense(n_in, n_out, bias, threads):
    lin = _sparse_linear(n_in, n_out, bias)
    sp = SparseLinear.from_linear(lin, backend="bitmask")
    assert sp.nnz == int(torch.count_nonzero(lin.weight))
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with torch.no_grad():
            for shape in [(n_in,), (1, 1, n_in), (3, n_in), (5, n_in), (2, 4, n_in)]:
                x = torch.randn(shape)
                y = sp(x)
                assert y.shape == (*shape[:-1], n_out)
                torch.testing.assert_close(y, lin(x), rtol=1e-5, atol=1e-5)
            xb = torch.randn(2, n_in, dtype=torch.bfloat16)  # other dtypes compute in float32
            torch.testing.assert_close(sp(xb), lin(xb.float()).to(torch.bfloat16), rtol=1e-2, atol=1e-2)
    finally:
        torch.set_num_threads(old)


@pytest.mark.skipif(not _has_avx2(), reason="the AVX2 matrix-vector kernel needs llvmlite and an AVX2+FMA CPU")
@pytest.mark.parametrize("threads", [1, 2])
def test_avx2_matvec_matches_dense(monkeypatch, threads):
    monkeypatch.setenv(kernels.ENV_SWITCH, "avx2")
    status = kernels.kernel_status()
    assert status["matvec_isa"] == "avx2" and status["matvec"] and status["decode_2byte"]
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for n_in, n_out, bias in [(37, 5, True), (64, 33, False), (100, 9, True)]:
            lin = _sparse_linear(n_in, n_out, bias, seed=n_in)
            sp = SparseLinear.from_linear(lin, backend="bitmask")
            with torch.no_grad():
                for shape in [(n_in,), (3, n_in), (5, n_in), (8, n_in)]:
                    x = torch.randn(shape)
                    torch.testing.assert_close(sp(x), lin(x), rtol=1e-5, atol=1e-5)
    finally:
        torch.set_num_threads(old)


@needs_kernels
@pytest.mark.parametrize("how", ["numba not importable", "no parallel driver"])
def test_bitmask_linear_without_numba_runs_on_one_thread(monkeypatch, caplog, how):
    """Without Numba, ``kernels.matvec`` runs the compiled row kernel itself, once over all
    rows, on the calling thread. Its products are bit-identical to the Numba path (each
    output row is computed by the same code, whichever thread runs it) and match dense."""
    lin = _sparse_linear(70, 37, True, seed=5)  # 70 inputs: 5 chunks of 16, the last padded
    sp = SparseLinear.from_linear(lin, backend="bitmask")
    xs = [torch.randn(shape) for shape in [(70,), (3, 70), (5, 70), (2, 4, 70)]]
    numba_installed = importlib.util.find_spec("numba") is not None
    old = torch.get_num_threads()
    torch.set_num_threads(2)  # matvec asks for the parallel driver only with more than one thread
    try:
        if numba_installed:
            assert kernels._parallel_matvec() is not None  # built (and cached) before the spy below
        compiled = kernels._compiled()
        row_kernel = compiled.matvec_rows
        calls: list = []

        def spy(*args):  # the single-thread call; the Numba driver calls the raw pointer instead
            calls.append(args[-2:])  # (r0, r1)
            return row_kernel(*args)

        monkeypatch.setattr(compiled, "matvec_rows", spy)
        with torch.no_grad():
            pooled = [sp(x) for x in xs]
        assert calls == ([] if numba_installed else [(0, 37)] * len(xs))  # with Numba: its pool ran them
        if how == "numba not importable":
            monkeypatch.setitem(sys.modules, "numba", None)  # `import numba` raises ImportError
            fresh = functools.lru_cache(maxsize=None)(kernels._parallel_driver.__wrapped__)
            monkeypatch.setattr(kernels, "_parallel_driver", fresh)  # the real one keeps its cached driver
        else:
            monkeypatch.setattr(kernels, "_parallel_matvec", lambda: None)
        calls.clear()
        with caplog.at_level(logging.INFO, logger="artemis.sparse.kernels"), torch.no_grad():
            single = [sp(x) for x in xs]
        assert calls == [(0, 37)] * len(xs)  # one call per product, over all 37 rows
        if how == "numba not importable":
            assert "numba is not installed; the sparse matrix-vector kernel runs on one thread" in caplog.text
        with torch.no_grad():
            for x, y1, yn in zip(xs, single, pooled):
                assert y1.shape == (*x.shape[:-1], 37)
                assert torch.equal(y1, yn)
                torch.testing.assert_close(y1, lin(x), rtol=1e-5, atol=1e-5)
    finally:
        torch.set_num_threads(old)


def test_bitmask_linear_errors(monkeypatch):
    with pytest.raises(ValueError, match=r"backend 'bitmask' runs on CPU with float32 weights; got torch.float64"):
        SparseLinear(torch.zeros(4, 4, dtype=torch.float64), backend="bitmask")
    monkeypatch.setenv(kernels.ENV_SWITCH, "off")
    with pytest.raises(
        ValueError,
        match=r"backend 'bitmask' is not available here: turned off by ARTEMIS_KERNELS=off; use backend='csr'",
    ):
        SparseLinear(torch.eye(4), backend="bitmask")
    monkeypatch.delenv(kernels.ENV_SWITCH)
    if kernels.matvec_ready():
        with pytest.raises(ValueError, match=r"bias has shape \(3,\); expected \(16,\)"):
            SparseLinear(torch.eye(16), torch.zeros(3), backend="bitmask")
        sp = SparseLinear(torch.eye(16), backend="bitmask")
        sp.row_offsets = sp.row_offsets.float()  # not what the kernel reads: refused, not misread
        with pytest.raises(RuntimeError, match=r"row_offsets torch.float32"):
            sp(torch.ones(16))


@needs_kernels
def test_bitmask_linear_gives_input_gradients_and_survives_copies():
    import copy

    lin = _sparse_linear(40, 12, True)
    sp = SparseLinear.from_linear(lin, backend="bitmask")
    assert torch.equal(sp.dense_weight(), lin.weight.detach())
    x = torch.randn(3, 40, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_(True)
    sp(x).square().sum().backward()
    lin(x_ref).square().sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-5, atol=1e-5)
    clone = copy.deepcopy(sp)
    del sp  # the copy has its own buffers, read at every call
    with torch.no_grad():
        torch.testing.assert_close(clone(x), lin(x), rtol=1e-5, atol=1e-5)


@needs_kernels
def test_sparsify_auto_times_both_cpu_kernels_and_keeps_the_fastest():
    from artemis import create_pruning_manager
    from tests.fixtures import lm_batch, tiny_llama

    model = tiny_llama()
    create_pruning_manager({"pruning": {"scope": "layer"}}, model).apply_magnitude_pruning(0.7)
    batch = lm_batch()
    with torch.no_grad():
        ref = model(input_ids=batch["input_ids"]).logits
    report = sparsify_for_inference(model, min_speedup=0.0, repeats=2)
    measured = {n: e for n, e in report.items() if "speedup" in e}
    assert len(measured) == 14
    for name, e in measured.items():
        assert e["backend"] == min(("bitmask", "csr"), key=lambda k: e[f"{k}_us"])
        assert model.get_submodule(name).backend == e["backend"]
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=batch["input_ids"]).logits, ref, rtol=1e-4, atol=1e-4)
    other = tiny_llama()
    create_pruning_manager({"pruning": {"scope": "layer"}}, other).apply_magnitude_pruning(0.7)
    forced = sparsify_for_inference(other, backend="bitmask", min_speedup=0.0, repeats=1)
    assert {e["backend"] for e in forced.values() if "backend" in e} == {"bitmask"}
    assert all("csr_us" not in e for e in forced.values())


@needs_kernels
def test_bitmask_linear_in_a_forked_child_and_from_two_threads():
    """Numba's thread pool is not fork- or thread-safe in every layer: a forked child and a
    second concurrent Python thread run the kernel on their own thread instead."""
    import os
    import threading

    lin = _sparse_linear(64, 48, True)
    sp = SparseLinear.from_linear(lin, backend="bitmask")
    x = torch.randn(2, 64)
    old = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with torch.no_grad():
            ref = lin(x)
            torch.testing.assert_close(sp(x), ref, rtol=1e-5, atol=1e-5)  # the parent uses the pool first
            errors: list = []

            def call() -> None:
                try:
                    for _ in range(200):
                        torch.testing.assert_close(sp(x), ref, rtol=1e-5, atol=1e-5)
                except Exception as exc:  # pragma: no cover - reported below
                    errors.append(exc)

            threads = [threading.Thread(target=call) for _ in range(3)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            assert not errors
            pid = os.fork()
            if pid == 0:  # pragma: no cover - the child reports through its exit status
                ok = torch.allclose(sp(x), ref, rtol=1e-5, atol=1e-5)
                os._exit(0 if ok else 1)
            _, status = os.waitpid(pid, 0)
            assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0
    finally:
        torch.set_num_threads(old)


@pytest.mark.skipif(
    not (kernels.decode_ready(2) and _cpu_has("avx512f", "avx2", "fma")),
    reason="needs an AVX-512 (avx512f) CPU with AVX2+FMA and the compiled decoder (llvmlite)",
)
def test_avx512_without_vbmi2_decodes_narrow_values_the_avx2_way():
    """A CPU with avx512f but no avx512vbmi2 (Skylake-X) has no 16-bit expand: its 1- and
    2-byte decoders are built with the AVX2 method. Simulated by compiling without vbmi2."""
    from llvmlite import binding

    host = dict(binding.get_host_cpu_features().items())
    features = ",".join(("+" if on and name != "avx512vbmi2" else "-") + name for name, on in host.items())
    compiled = kernels._Compiled("avx512", features, narrow_expand=False)
    g = torch.Generator().manual_seed(3)
    for dtype in (torch.bfloat16, torch.int8, torch.float32):
        w = (torch.randn(7, 45, generator=g) * 3).to(dtype)
        w[torch.rand(7, 45, generator=g) < 0.6] = 0
        parts = bitmask_compress(w)
        vals = parts["compressed"].contiguous()
        v = vals.view({1: torch.uint8, 2: torch.int16, 4: torch.int32}[vals.element_size()]).numpy()
        out = np.zeros(7 * 45, dtype=v.dtype)
        bits = parts["bitmask"].numpy()
        end = compiled.decode[v.itemsize](
            bits.ctypes.data,
            bits.shape[1],
            v.ctypes.data,
            v.size,
            parts["row_offsets"].numpy().ctypes.data,
            45,
            out.ctypes.data,
            0,
            7,
        )
        assert end == v.size
        assert torch.equal(torch.from_numpy(out.reshape(7, 45)).view(dtype), w)
