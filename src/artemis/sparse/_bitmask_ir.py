"""LLVM IR for the bitmask kernels, compiled for this CPU with llvmlite (see :mod:`artemis.sparse.kernels`).

The AVX-512 kernels are built on LLVM's target-independent ``llvm.masked.expandload``
intrinsic: it reads the next ``popcount(mask)`` packed items and places them in the lanes
whose mask bit is set. With AVX-512 LLVM lowers it to one ``vexpandps``/``vpexpand{b,w,d}``
instruction (a 64-byte bitmask decode); elsewhere to a lane-by-lane loop, which is why
:mod:`artemis.sparse.kernels` only compiles these for hosts with the instruction. The AVX2
matrix·vector expands 8 lanes with a masked load and a ``vpermps`` by a 256-entry table.

Functions (C calling convention; sizes are int64, matrices row-major):

``decode_w{1,2,4}(bits, bstride, vals, nvals, offsets, cols, out, r0, r1) -> int64``
    (AVX-512: 64-byte chunks with one expand; AVX2: 8 items per chunk with a load, a
    ``vpermd`` by the index table and a select)
    rows ``r0 .. r1-1`` (``r0 < r1``) of a bitmask matrix of ``cols`` columns into ``out``
    (dense, ``rows × cols`` items of 1/2/4 bytes; every item written). ``bits`` holds
    ``bstride`` bytes per row (bit ``j`` of a row = byte ``j // 8``, bit ``j % 8``, no bit set
    at or beyond ``cols``); ``offsets[r]`` is the index in ``vals`` (``nvals`` items) of row
    ``r``'s first kept item. ``offsets[r0]`` must lie in ``[0, nvals]``, each later row's
    offset must equal the running count, and each row's values must lie below ``nvals``;
    all is checked before the row is read: returns ``-(r + 1)`` for the first bad row ``r``,
    else the index after the last value used (the caller compares it with the next row's
    offset or ``nvals``, and checks ``offsets[0] == 0``).
``matvec_rows_{avx512,avx2}(masks, chunks, vals, offsets, x, xstride, bias, out, ostride, batch, r0, r1)``
    ``out[b, r] = bias[r] + Σ_c expand(vals[offsets[r]:], masks[r, c]) · x[b, 16c : 16c+16]``
    for rows ``r0 .. r1-1`` and ``b < batch``, float32; ``masks`` is uint16 ``(rows, chunks)``
    and each ``x`` row holds ``16 × chunks`` floats (zero-padded). Input rows are taken
    ``GROUP`` at a time, so that each expansion of a weight chunk feeds ``GROUP`` FMAs;
    the last ``batch % GROUP`` rows go one at a time.

The decoders check the row offsets and value count themselves (above); callers check
shapes, dtypes and the bits beyond ``cols``. ``matvec_rows`` checks nothing: its
operands are built by Artemis (:class:`artemis.sparse.inference.SparseLinear`).

Example (building the IR needs llvmlite only; compiling it is :mod:`artemis.sparse.kernels`' job):
    >>> from artemis.sparse._bitmask_ir import build_module
    >>> sorted(f.name for f in build_module("avx2").functions if not f.is_declaration)
    ['decode_w1', 'decode_w2', 'decode_w4', 'matvec_rows_avx2']
    >>> "llvm.masked.expandload" in str(build_module("avx512"))
    True
"""

from __future__ import annotations

from typing import Callable

from llvmlite import ir

__all__ = ["build_module", "PREFETCH_ITEMS"]

I1, I8, I16, I32, I64 = ir.IntType(1), ir.IntType(8), ir.IntType(16), ir.IntType(32), ir.IntType(64)
F32 = ir.FloatType()
PTR = I8.as_pointer()
PREFETCH_ITEMS = 1024  # matvec: prefetch the value stream 4 KiB ahead (its stride is data-dependent)
GROUP = 4  # matvec: input rows that share one expansion of each weight chunk


def _c(v: int, ty: ir.Type = I64) -> ir.Constant:
    return ir.Constant(ty, v)


def _intrinsic(module: ir.Module, name: str, ret: ir.Type, args: list) -> ir.Function:
    fn = module.globals.get(name)
    return fn if fn is not None else ir.Function(module, ir.FunctionType(ret, args), name)


def _loop(builder: ir.IRBuilder, start, stop, init: list, body: Callable) -> list:
    """``for i in range(start, stop)`` with loop-carried values ``init``; ``body(i, values)``
    returns the next values. Returns the values after the loop (``init`` if it ran 0 times)."""
    entry = builder.block
    head = builder.append_basic_block("loop")
    after = builder.append_basic_block("after")
    builder.cbranch(builder.icmp_signed("<", start, stop), head, after)
    builder.position_at_end(head)
    i = builder.phi(I64)
    carried = [builder.phi(v.type) for v in init]
    new = body(i, carried)
    i_next = builder.add(i, _c(1))
    end = builder.block
    i.add_incoming(start, entry)
    i.add_incoming(i_next, end)
    for phi, v0, v1 in zip(carried, init, new):
        phi.add_incoming(v0, entry)
        phi.add_incoming(v1, end)
    builder.cbranch(builder.icmp_signed("<", i_next, stop), head, after)
    builder.position_at_end(after)
    out = []
    for v0, v1 in zip(init, new):
        phi = builder.phi(v0.type)
        phi.add_incoming(v0, entry)
        phi.add_incoming(v1, end)
        out.append(phi)
    return out


def _decode(module: ir.Module, width: int, isa: str = "avx512") -> None:
    lanes = 64 // width if isa == "avx512" else 8
    step = lanes // 8  # mask bytes per chunk
    ety = ir.IntType(8 * width)
    vec = ir.VectorType(ety, lanes)
    mty = ir.IntType(lanes)
    mvec = ir.VectorType(I1, lanes)
    bvec = ir.VectorType(I8, step)
    sfx = f"v{lanes}i{8 * width}"
    fn = ir.Function(
        module, ir.FunctionType(I64, [PTR, I64, PTR, I64, I64.as_pointer(), I64, PTR, I64, I64]), f"decode_w{width}"
    )
    bits, bstride, vals, nvals, offsets, cols, out, r0, r1 = fn.args
    b = ir.IRBuilder(fn.append_basic_block("entry"))
    ctpop = _intrinsic(module, f"llvm.ctpop.i{lanes}", mty, [mty])
    mstore = _intrinsic(module, f"llvm.masked.store.{sfx}.p0", ir.VoidType(), [vec, vec.as_pointer(), I32, mvec])
    mload = _intrinsic(
        module, f"llvm.masked.load.v{step}i8.p0", bvec, [bvec.as_pointer(), I32, ir.VectorType(I1, step), bvec]
    )
    ebase = b.bitcast(vals, ety.as_pointer())
    obase = b.bitcast(out, ety.as_pointer())
    expand = _chunk_expander(module, b, width, isa, b.gep(ebase, [nvals]))
    full = b.sdiv(cols, _c(lanes))
    tail = b.sub(cols, b.mul(full, _c(lanes)))
    has_tail = b.icmp_signed(">", tail, _c(0))
    # lanes < tail (stored) and mask bytes < ceil(tail / 8) (loaded) of the last, partial chunk
    tail_lanes = b.bitcast(b.trunc(b.sub(b.shl(_c(1), tail), _c(1)), mty), mvec)
    tail_bytes = b.sdiv(b.add(tail, _c(7)), _c(8))
    tail_bmask = b.bitcast(b.trunc(b.sub(b.shl(_c(1), tail_bytes), _c(1)), ir.IntType(step)), ir.VectorType(I1, step))

    def chunk_mask(brow, c):
        return b.load(b.bitcast(b.gep(brow, [b.mul(c, _c(step))]), mty.as_pointer()), align=1)

    def tail_mask(brow):
        mb = b.call(
            mload,
            [
                b.bitcast(b.gep(brow, [b.mul(full, _c(step))]), bvec.as_pointer()),
                _c(1, I32),
                tail_bmask,
                ir.Constant(bvec, None),
            ],
        )
        return b.bitcast(b.select(tail_bmask, mb, ir.Constant(bvec, [0] * step)), mty)

    def popcount(m):
        return b.zext(b.call(ctpop, [m]), I64)

    def row(r, carried):
        (k,) = carried
        brow = b.gep(bits, [b.mul(r, bstride)])
        # the row's values are vals[k : k + count]: its offset must be k and they must exist
        (count,) = _loop(b, _c(0), full, [_c(0)], lambda c, acc: [b.add(acc[0], popcount(chunk_mask(brow, c)))])
        count = b.select(has_tail, b.add(count, popcount(tail_mask(brow))), count)
        bad = b.or_(b.icmp_signed("!=", b.load(b.gep(offsets, [r])), k), b.icmp_unsigned(">", count, b.sub(nvals, k)))
        with b.if_then(bad, likely=False):
            b.ret(b.sub(_c(-1), r))  # -(r + 1)
        orow = b.gep(obase, [b.mul(r, cols)])

        def chunk(c, carried):
            (p,) = carried
            m = chunk_mask(brow, c)
            b.store(expand(p, m), b.bitcast(b.gep(orow, [b.mul(c, _c(lanes))]), vec.as_pointer()), align=1)
            return [b.gep(p, [popcount(m)])]

        (p_end,) = _loop(b, _c(0), full, [b.gep(ebase, [k])], chunk)
        with b.if_then(has_tail):
            m = tail_mask(brow)
            v = expand(p_end, m)
            b.call(
                mstore, [v, b.bitcast(b.gep(orow, [b.mul(full, _c(lanes))]), vec.as_pointer()), _c(1, I32), tail_lanes]
            )
        return [b.add(k, count)]

    # k starts at offsets[r0], which must lie in [0, nvals] (unsigned compare: a negative
    # offset is huge); from there on k only grows and each row checks it stays <= nvals
    start = b.load(b.gep(offsets, [r0]))
    with b.if_then(b.icmp_unsigned(">", start, nvals), likely=False):
        b.ret(b.sub(_c(-1), r0))
    (k_end,) = _loop(b, r0, r1, [start], row)
    b.ret(k_end)


def _chunk_expander(module: ir.Module, b: ir.IRBuilder, width: int, isa: str, end=None) -> Callable:
    """``expand(p, m) -> lanes``: one chunk of a row, the kept items at ``p`` placed in the
    lanes whose bit of ``m`` is set, zeros elsewhere.

    AVX-512: one expand of 64 bytes. AVX2: 8 lanes; the items are read with a masked load
    of exactly ``popcount(m)`` of them, or, given ``end`` (one past the last value), with a
    plain 8-item load wherever 8 items remain (a masked load of 1- or 2-byte items has
    no AVX2 instruction), then widened to 32 bits, moved by ``vpermd`` with the index
    table, and narrowed back."""
    ety = ir.IntType(8 * width)
    if isa == "avx512":
        lanes = 64 // width
        vec = ir.VectorType(ety, lanes)
        expand = _intrinsic(
            module,
            f"llvm.masked.expandload.v{lanes}i{8 * width}",
            vec,
            [ety.as_pointer(), ir.VectorType(I1, lanes), vec],
        )
        return lambda p, m: b.call(expand, [p, b.bitcast(m, ir.VectorType(I1, lanes)), ir.Constant(vec, None)])
    if end is None and width != 4:
        raise ValueError("the AVX2 expand without `end` needs 4-byte items (a native masked load)")
    vec = ir.VectorType(ety, 8)
    v32 = ir.VectorType(I32, 8)
    table = _perm_table(module)
    permd = _intrinsic(module, "llvm.x86.avx2.permd", v32, [v32, v32])
    ctpop8 = _intrinsic(module, "llvm.ctpop.i8", I8, [I8])
    mload = _intrinsic(
        module, f"llvm.masked.load.v8i{8 * width}.p0", vec, [vec.as_pointer(), I32, ir.VectorType(I1, 8), vec]
    )
    lane_ids = ir.Constant(v32, list(range(8)))
    lane_bits = ir.Constant(v32, [1 << j for j in range(8)])
    zeros = ir.Constant(vec, [0] * 8)

    def splat(v):
        return b.shuffle_vector(
            b.insert_element(ir.Constant(v32, None), v, _c(0, I32)), ir.Constant(v32, None), ir.Constant(v32, [0] * 8)
        )

    def masked_load(p, n):  # exactly n items, the other lanes 0
        return b.call(
            mload, [b.bitcast(p, vec.as_pointer()), _c(1, I32), b.icmp_unsigned("<", lane_ids, splat(n)), zeros]
        )

    def expand(p, m):
        n = b.zext(b.call(ctpop8, [m]), I32)
        if end is None:
            v = masked_load(p, n)
        else:
            safe = b.icmp_unsigned("<=", b.add(b.ptrtoint(p, I64), _c(8 * width)), b.ptrtoint(end, I64))
            with b.if_else(safe) as (whole, near_end):
                with whole:
                    v_whole = b.load(b.bitcast(p, vec.as_pointer()), align=1)
                    bb_whole = b.block
                with near_end:
                    v_near = masked_load(p, n)
                    bb_near = b.block
            v = b.phi(vec)
            v.add_incoming(v_whole, bb_whole)
            v.add_incoming(v_near, bb_near)
        wide = v if width == 4 else b.zext(v, v32)
        idx = b.load(b.bitcast(b.gep(table, [_c(0), b.zext(m, I64)]), v32.as_pointer()), align=4)
        placed = b.call(permd, [wide, idx])
        if end is not None:  # a plain load leaves items past the row's in lane 7: zero the clear lanes
            keep = b.icmp_unsigned("!=", b.and_(splat(b.zext(m, I32)), lane_bits), ir.Constant(v32, [0] * 8))
            placed = b.select(keep, placed, ir.Constant(v32, [0] * 8))
        # else lane 7 is 0 whenever a bit is clear (fewer than 8 items loaded), and the table
        # sends every clear lane to lane 7
        return placed if width == 4 else b.trunc(placed, vec)

    return expand


def _perm_table(module: ir.Module) -> ir.GlobalVariable:
    """For each byte ``m``: the ``vpermps`` indices that move the ``popcount(m)`` packed
    values of a vector into the lanes whose bit is set; other lanes take lane 7, which
    is zero whenever some bit is clear (the masked load fills it with 0)."""
    rows = []
    for m in range(256):
        rank, idx = 0, []
        for j in range(8):
            if m >> j & 1:
                idx.append(rank)
                rank += 1
            else:
                idx.append(7)
        rows.append(ir.Constant(ir.ArrayType(I32, 8), idx))
    if "expand8_perm" in module.globals:
        return module.globals["expand8_perm"]
    ty = ir.ArrayType(ir.ArrayType(I32, 8), 256)
    table = ir.GlobalVariable(module, ty, "expand8_perm")
    table.global_constant = True
    table.linkage = "internal"
    table.initializer = ir.Constant(ty, rows)
    return table


def _expander(module: ir.Module, b: ir.IRBuilder, isa: str) -> Callable:
    """``expand(p, m) -> (16 floats, p + popcount(m))``: the 16 lanes of a uint16 mask ``m``
    filled from the packed float32 values at ``p``."""
    vec = ir.VectorType(F32, 16)
    fp = F32.as_pointer()
    if isa == "avx512":
        expand = _intrinsic(module, "llvm.masked.expandload.v16f32", vec, [fp, ir.VectorType(I1, 16), vec])
        ctpop = _intrinsic(module, "llvm.ctpop.i16", I16, [I16])
        zero = ir.Constant(vec, [0.0] * 16)

        def expand16(p, m):
            v = b.call(expand, [p, b.bitcast(m, ir.VectorType(I1, 16)), zero])
            return v, b.gep(p, [b.zext(b.call(ctpop, [m]), I64)])

        return expand16
    # AVX2 has no expand instruction: 8 lanes at a time with the decoders' method
    expand8 = _chunk_expander(module, b, 4, "avx2")
    ctpop8 = _intrinsic(module, "llvm.ctpop.i8", I8, [I8])
    v8 = ir.VectorType(F32, 8)

    def half(p, m8):
        lanes8 = b.bitcast(expand8(b.bitcast(p, I32.as_pointer()), m8), v8)
        return lanes8, b.gep(p, [b.zext(b.call(ctpop8, [m8]), I64)])

    def expand16(p, m):
        lo, p = half(p, b.trunc(m, I8))
        hi, p = half(p, b.trunc(b.lshr(m, ir.Constant(I16, 8)), I8))
        return b.shuffle_vector(lo, hi, ir.Constant(ir.VectorType(I32, 16), list(range(16)))), p

    return expand16


def _matvec(module: ir.Module, isa: str) -> None:
    vec = ir.VectorType(F32, 16)
    fp = F32.as_pointer()
    fn = ir.Function(
        module,
        ir.FunctionType(
            ir.VoidType(), [I16.as_pointer(), I64, fp, I64.as_pointer(), fp, I64, fp, fp, I64, I64, I64, I64]
        ),
        f"matvec_rows_{isa}",
    )
    masks, chunks, vals, offsets, x, xstride, bias, out, ostride, batch, r0, r1 = fn.args
    b = ir.IRBuilder(fn.append_basic_block("entry"))
    expand16 = _expander(module, b, isa)
    fma = _intrinsic(module, "llvm.fma.v16f32", vec, [vec, vec, vec])
    reduce = _intrinsic(module, "llvm.vector.reduce.fadd.v16f32", F32, [F32, vec])
    prefetch = _intrinsic(module, "llvm.prefetch.p0", ir.VoidType(), [PTR, I32, I32, I32])
    zero = ir.Constant(vec, [0.0] * 16)
    pairs = b.sdiv(chunks, _c(2))

    def step(mrow, xrow, c, p, acc):
        b.call(prefetch, [b.bitcast(b.gep(p, [_c(PREFETCH_ITEMS)]), PTR), _c(0, I32), _c(3, I32), _c(1, I32)])
        v, p_next = expand16(p, b.load(b.gep(mrow, [c])))
        xv = b.load(b.bitcast(b.gep(xrow, [b.mul(c, _c(16))]), vec.as_pointer()), align=4)
        return p_next, b.call(fma, [v, xv, acc])

    def row(r, _):
        mrow = b.gep(masks, [b.mul(r, chunks)])
        vbase = b.gep(vals, [b.load(b.gep(offsets, [r]))])
        bias_r = b.load(b.gep(bias, [r]))

        def one(bi, _):
            xrow = b.gep(x, [b.mul(bi, xstride)])

            def pair(i, carried):  # two accumulators: the FMA latency, not the loads, bounds one
                p, a0, a1 = carried
                c = b.mul(i, _c(2))
                p, a0 = step(mrow, xrow, c, p, a0)
                p, a1 = step(mrow, xrow, b.add(c, _c(1)), p, a1)
                return [p, a0, a1]

            p, a0, a1 = _loop(b, _c(0), pairs, [vbase, zero, zero], pair)

            def last(c, carried):
                p2, acc = carried
                return list(step(mrow, xrow, c, p2, acc))

            _, acc = _loop(b, b.mul(pairs, _c(2)), chunks, [p, b.fadd(a0, a1)], last)
            total = b.call(reduce, [ir.Constant(F32, 0.0), acc], fastmath=("reassoc",))
            b.store(b.fadd(total, bias_r), b.gep(out, [b.add(b.mul(bi, ostride), r)]))
            return []

        def group(g, _):  # GROUP input rows at once: each chunk expanded once, GROUP FMAs
            b0 = b.mul(g, _c(GROUP))
            xrows = [b.gep(x, [b.mul(b.add(b0, _c(j)), xstride)]) for j in range(GROUP)]

            def chunk(c, carried):
                p, accs = carried[0], carried[1:]
                b.call(prefetch, [b.bitcast(b.gep(p, [_c(PREFETCH_ITEMS)]), PTR), _c(0, I32), _c(3, I32), _c(1, I32)])
                v, p_next = expand16(p, b.load(b.gep(mrow, [c])))
                new = []
                for xr, acc in zip(xrows, accs):
                    xv = b.load(b.bitcast(b.gep(xr, [b.mul(c, _c(16))]), vec.as_pointer()), align=4)
                    new.append(b.call(fma, [v, xv, acc]))
                return [p_next, *new]

            done = _loop(b, _c(0), chunks, [vbase] + [zero] * GROUP, chunk)
            for j, acc in enumerate(done[1:]):
                total = b.call(reduce, [ir.Constant(F32, 0.0), acc], fastmath=("reassoc",))
                b.store(b.fadd(total, bias_r), b.gep(out, [b.add(b.mul(b.add(b0, _c(j)), ostride), r)]))
            return []

        groups = b.sdiv(batch, _c(GROUP))
        _loop(b, _c(0), groups, [], group)
        _loop(b, b.mul(groups, _c(GROUP)), batch, [], one)
        return []

    _loop(b, r0, r1, [], row)
    b.ret_void()


def build_module(isa: str, narrow_expand: bool = True) -> ir.Module:
    """The IR module for ``isa`` (``"avx512"`` or ``"avx2"``): ``decode_w1/2/4`` and
    ``matvec_rows_<isa>``. With ``isa="avx512"`` and ``narrow_expand=False`` (a CPU without
    ``avx512vbmi2``, which has no 8/16-bit expand) the 1- and 2-byte decoders use the AVX2
    method. Compile it only for a CPU with that instruction set."""
    if isa not in ("avx512", "avx2"):
        raise ValueError(f"unknown isa {isa!r}; valid: 'avx512', 'avx2'")
    module = ir.Module(name=f"artemis_bitmask_{isa}")
    for width in (1, 2, 4):
        _decode(module, width, isa if (isa == "avx2" or width == 4 or narrow_expand) else "avx2")
    _matvec(module, isa)
    return module
