"""Softmax attention for CPU inference, one (batch, head) at a time: keys as vector lanes.

An encoder's attention core at batch 1 is small matrices: 12 heads of 128 x 128 scores over 32
dimensions (MiniLM). torch's flash kernel for CPU cuts that into 32-row blocks and calls a GEMM
routine per block, so fixed costs, not FMAs, set its time (~0.3 ms a layer here, a fifth of
a pruned MiniLM's forward). Here each head is whole rows:

- **K transposed once per head** into kt (dims, keys), so a vector of 16 keys is one load.
- **Scores 4 query rows x 64 keys at a time** (16 accumulators in registers, LLVM IR): per
  dimension, four key vectors loaded, four query values broadcast, 16 FMAs.
- **Softmax on whole rows** in a row buffer (scale, mask, max, then a vectorized exp: Cody-Waite
  reduction and a degree-6 polynomial, ~1 ulp), no online rescaling: a row of scores is a few KB.
- **P @ V up to 8 query rows x the head's dimensions at a time** (16 accumulators), scaled by
  1 / the row's sum once, written straight into a (batch, query, head, dim) output, which is the
  layout the model reshapes it to next.

Scores and P @ V are the same LLVM IR loop (`_outer_codegen`): per step, a few vectors loaded
from one operand, one value per row broadcast from the other, rows x vectors FMAs.

Heads are split between threads in equal shares. Inference only: no dropout, no causal mask (a
causal or dropout call stays with torch), dims a multiple of 16.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import cache, lru_cache
from typing import Any

import numpy as np

from prunekit.runtime.kernels.buffers import aligned_allocator
from prunekit.runtime.kernels.ir_transpose import transpose_intrinsic
from prunekit.runtime.kernels.numba_setup import import_numba, prefer_openmp

LANES = 16  # fp32 lanes per vector (one AVX-512 register)
SCORE_ROWS = 4  # query rows per scores pass
SCORE_VECTORS = 4  # key vectors (64 keys) per scores pass
BLOCK_ROWS = 8  # query rows whose scores, softmax and P @ V are done together
MASKS = ("none", "add", "keep")  # no mask; an additive fp32 mask; a boolean one (True: attend), as bytes
NONE, ADD, KEEP = range(3)
FLOOR = -80.0  # exp's input is clamped here: exp(-80) ~ 2e-35, nothing next to a row's maximum (1)


def _pointer(builder: Any, base: Any, offset: Any, vec: Any) -> Any:
    return builder.bitcast(builder.gep(base, [offset]), vec.as_pointer())


def _function(builder: Any, name: str, result: Any, *params: Any) -> Any:
    """LLVM intrinsic `name`, declared in the module on first use."""
    from llvmlite import ir

    module = builder.module
    return module.globals.get(name) or ir.Function(module, ir.FunctionType(result, list(params)), name)


def _splat(builder: Any, value: Any, vec: Any) -> Any:
    """`value` (a float) in every lane of `vec`."""
    from llvmlite import ir

    i32, undefined = ir.IntType(32), ir.Constant(vec, ir.Undefined)
    one = builder.insert_element(undefined, value, ir.Constant(i32, 0))
    return builder.shuffle_vector(one, undefined, ir.Constant(ir.VectorType(i32, vec.count), [0] * vec.count))


def _counted_loop(builder: Any, count: Any, name: str) -> tuple[Any, Any, Any, Any]:
    """(entry, loop, done, i): blocks of ``for i in range(count)``, the builder left at the top of the body."""
    from llvmlite import ir

    entry = builder.block
    loop, done = builder.append_basic_block(f"{name}.loop"), builder.append_basic_block(f"{name}.done")
    builder.cbranch(builder.icmp_signed(">", count, ir.Constant(count.type, 0)), loop, done)
    builder.position_at_end(loop)
    return entry, loop, done, builder.phi(count.type)


def _exp_codegen() -> Callable[..., Any]:
    """``s[so :][: 16 n] = exp(s[so :][: 16 n] - top)``, returning their sum (IR, 16 lanes at a time).

    Arguments (s, so, n, top). exp(x) = 2^k * p(r) with k = round(x / ln 2), r = x - k ln 2 (in
    two parts, Cody-Waite) and p Cephes' degree-6 polynomial; x is clamped to [`FLOOR`, 0].
    """
    from llvmlite import ir

    f32, i32 = ir.FloatType(), ir.IntType(32)
    vec, ivec = ir.VectorType(f32, LANES), ir.VectorType(i32, LANES)

    def splat(value: float) -> Any:
        return ir.Constant(vec, [value] * LANES)

    def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
        ps = context.make_array(signature.args[0])(context, builder, args[0]).data
        so, n, top = args[1], args[2], args[3]
        intp = so.type
        fma = _function(builder, "llvm.fma.v16f32", vec, vec, vec, vec)
        maxnum = _function(builder, "llvm.maxnum.v16f32", vec, vec, vec)
        rint = _function(builder, "llvm.rint.v16f32", vec, vec)
        shift = _splat(builder, top, vec)
        entry, loop, done, i = _counted_loop(builder, n, "exp")
        total = builder.phi(vec)
        at = _pointer(builder, ps, builder.add(so, builder.mul(i, ir.Constant(intp, LANES))), vec)
        x = builder.call(maxnum, [builder.fsub(builder.load(at, align=4), shift), splat(FLOOR)])
        k = builder.call(rint, [builder.fmul(x, splat(1.44269504088896341))])
        r = builder.call(fma, [k, splat(-0.693359375), x])
        r = builder.call(fma, [k, splat(2.12194440e-4), r])
        p = splat(1.9875691500e-4)
        for c in (1.3981999507e-3, 8.3334519073e-3, 4.1665795894e-2, 1.6666665459e-1, 5.0000001201e-1):
            p = builder.call(fma, [p, r, splat(c)])
        p = builder.call(fma, [p, builder.fmul(r, r), builder.fadd(r, splat(1.0))])
        exponent = builder.shl(builder.add(builder.fptosi(k, ivec), ir.Constant(ivec, [127] * LANES)),
                               ir.Constant(ivec, [23] * LANES))
        value = builder.fmul(p, builder.bitcast(exponent, vec))
        builder.store(value, at, align=4)
        summed = builder.fadd(total, value)
        following = builder.add(i, ir.Constant(intp, 1))
        builder.cbranch(builder.icmp_signed("<", following, n), loop, done)
        i.add_incoming(ir.Constant(intp, 0), entry)
        i.add_incoming(following, loop)
        total.add_incoming(splat(0.0), entry)
        total.add_incoming(summed, loop)
        builder.position_at_end(done)
        result = builder.phi(vec)
        result.add_incoming(splat(0.0), entry)
        result.add_incoming(summed, loop)
        reduce = _function(builder, "llvm.vector.reduce.fadd.v16f32", f32, f32, vec)
        return builder.call(reduce, [ir.Constant(f32, 0.0), result])

    return codegen


def _scale_codegen(mask: str) -> Callable[..., Any]:
    """``s[so :][: 16 n] = s[so :][: 16 n] * scale``, masked, returning their maximum (IR).

    Arguments (s, mask, so, mo, n, scale). `mask` says how the mask row at mask[mo:] applies:
    "none" (not read), "add" (fp32, added) or "keep" (bytes, 0 where a key is masked out: -inf).
    """
    from llvmlite import ir

    f32, i8 = ir.FloatType(), ir.IntType(8)
    vec, bytes16 = ir.VectorType(f32, LANES), ir.VectorType(i8, LANES)

    def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
        ps, pm = (context.make_array(t)(context, builder, a).data
                  for t, a in zip(signature.args[:2], args[:2], strict=True))
        so, mo, n, scale = args[2:6]
        intp = so.type
        maxnum = _function(builder, "llvm.maxnum.v16f32", vec, vec, vec)
        factor = _splat(builder, scale, vec)
        lowest = ir.Constant(vec, [float("-inf")] * LANES)
        entry, loop, done, i = _counted_loop(builder, n, "scale")
        top = builder.phi(vec)
        offset = builder.mul(i, ir.Constant(intp, LANES))
        at = _pointer(builder, ps, builder.add(so, offset), vec)
        value = builder.fmul(builder.load(at, align=4), factor)
        if mask == "add":
            value = builder.fadd(value, builder.load(_pointer(builder, pm, builder.add(mo, offset), vec), align=4))
        elif mask == "keep":
            row = builder.bitcast(pm, i8.as_pointer())
            keep = builder.load(_pointer(builder, row, builder.add(mo, offset), bytes16), align=1)
            masked_out = builder.icmp_unsigned("==", keep, ir.Constant(bytes16, [0] * LANES))
            value = builder.select(masked_out, ir.Constant(vec, [float("-inf")] * LANES), value)
        builder.store(value, at, align=4)
        highest = builder.call(maxnum, [top, value])
        following = builder.add(i, ir.Constant(intp, 1))
        builder.cbranch(builder.icmp_signed("<", following, n), loop, done)
        i.add_incoming(ir.Constant(intp, 0), entry)
        i.add_incoming(following, loop)
        top.add_incoming(lowest, entry)
        top.add_incoming(highest, loop)
        builder.position_at_end(done)
        result = builder.phi(vec)
        result.add_incoming(lowest, entry)
        result.add_incoming(highest, loop)
        reduce = _function(builder, "llvm.vector.reduce.fmax.v16f32", f32, vec)
        return builder.call(reduce, [result])

    return codegen


def _outer_codegen(rows: int, vectors: int, scaled: bool) -> Callable[..., Any]:
    """``dst[doff[r] :][: 16 v] = scale[r] * sum_c a[aoff[r] + c] * b[b0 + c * bs :][: 16 v]`` for `rows` rows (IR).

    Without `scaled` the sums are stored as they are (`scale` is not read).
    Arguments (a, b, dst, aoff, doff, scale, count, b0, bs): per step c, `vectors` loads from b and
    one broadcast from a per row feed rows x vectors FMAs (16 accumulators at most). Scores are
    this with a = q, b = the keys as lanes; P @ V with a = the softmax rows, b = v.
    """
    from llvmlite import ir

    vec = ir.VectorType(ir.FloatType(), LANES)

    def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
        pa, pb, pdst, paoff, pdoff, pscale = (context.make_array(t)(context, builder, a).data
                                              for t, a in zip(signature.args[:6], args[:6], strict=True))
        count, b0, bs = args[6:9]
        intp = count.type
        fma = _function(builder, "llvm.fma.v16f32", vec, vec, vec, vec)

        def at(pointer: Any, r: int) -> Any:
            return builder.load(builder.gep(pointer, [ir.Constant(intp, r)]))

        row_starts = [at(paoff, r) for r in range(rows)]
        initial = [ir.Constant(vec, [0.0] * LANES)] * (rows * vectors)
        entry, loop, done, c = _counted_loop(builder, count, "outer")
        carried = [builder.phi(vec) for _ in initial]
        line = builder.add(b0, builder.mul(c, bs))
        loaded = [builder.load(_pointer(builder, pb, builder.add(line, ir.Constant(intp, LANES * i)), vec), align=4)
                  for i in range(vectors)]
        updated = []
        for r in range(rows):
            weight = _splat(builder, builder.load(builder.gep(pa, [builder.add(row_starts[r], c)])), vec)
            updated += [builder.call(fma, [weight, loaded[i], carried[r * vectors + i]]) for i in range(vectors)]
        following = builder.add(c, ir.Constant(intp, 1))
        builder.cbranch(builder.icmp_signed("<", following, count), loop, done)
        c.add_incoming(ir.Constant(intp, 0), entry)
        c.add_incoming(following, loop)
        for acc, before, after in zip(carried, initial, updated, strict=True):
            acc.add_incoming(before, entry)
            acc.add_incoming(after, loop)
        builder.position_at_end(done)
        totals = [builder.phi(vec) for _ in initial]  # phis first, as LLVM requires
        for total, before, after in zip(totals, initial, updated, strict=True):
            total.add_incoming(before, entry)
            total.add_incoming(after, loop)
        for r in range(rows):
            scale, start = _splat(builder, at(pscale, r), vec) if scaled else None, at(pdoff, r)
            for i in range(vectors):
                target = _pointer(builder, pdst, builder.add(start, ir.Constant(intp, LANES * i)), vec)
                total = totals[r * vectors + i]
                builder.store(builder.fmul(total, scale) if scaled else total, target, align=4)
        return context.get_dummy_value()

    return codegen


@lru_cache(maxsize=64)
def split(units: int, runs: int) -> np.ndarray:
    """Run c of `runs` takes (batch, head) units ``split[c] .. split[c + 1] - 1``: equal shares."""
    return np.array([round(c * units / runs) for c in range(runs + 1)], np.int64)


def values_rows(dims: int) -> int:
    """Query rows per P @ V pass for a head of `dims` (16 accumulators: 8 rows of 32 dims, 4 of 64, ...)."""
    return max(1, min(BLOCK_ROWS, LANES // (dims // LANES)))


@cache
def kernels(dims: int) -> Any:
    """``attend(q, k, v, mask, mask_kind, scale, out, bounds)`` for heads of `dims` (a multiple of 16), compiled.

    `mask_kind` is the index in `MASKS` of how `mask` applies: not at all, added (fp32), or kept
    where non-zero (uint8: a boolean mask's bytes).
    """
    numba = import_numba()
    prefer_openmp(numba)
    from numba import types
    from numba.extending import intrinsic

    def outer_intrinsic(rows: int, vectors: int, scaled: bool) -> Any:
        @intrinsic
        def outer(typingctx, a, b, dst, aoff, doff, scale, count, b0, bs):  # type: ignore[no-untyped-def]  # pragma: no cover
            return types.void(a, b, dst, aoff, doff, scale, *[types.intp] * 3), _outer_codegen(rows, vectors, scaled)

        return outer

    @intrinsic
    def exp_rows(typingctx, s, so, n, top):  # type: ignore[no-untyped-def]  # pragma: no cover - compiled
        return types.float32(s, types.intp, types.intp, types.float32), _exp_codegen()

    def scale_intrinsic(kind: str) -> Any:
        @intrinsic
        def scale_rows(typingctx, s, mask, so, mo, n, scale):  # type: ignore[no-untyped-def]  # pragma: no cover
            return types.float32(s, mask, types.intp, types.intp, types.intp, types.float32), _scale_codegen(kind)

        return scale_rows

    scale_only, scale_add, scale_keep = (scale_intrinsic(kind) for kind in MASKS)
    rows_per_pass, vectors = values_rows(dims), dims // LANES

    values = outer_intrinsic(rows_per_pass, vectors, True)
    four, three, two, one = (outer_intrinsic(SCORE_ROWS, n, False) for n in range(SCORE_VECTORS, 0, -1))
    aligned_f32, transpose = aligned_allocator(), transpose_intrinsic(False)

    @numba.njit(nogil=True, cache=True, parallel=True)
    def attend(q, k, v, mask, mask_kind, scale, out, bounds):  # pragma: no cover - compiled
        """out[b, i, h] = softmax(q[b, h, i] . k[b, hk] * scale + mask[b, h, i]) @ v[b, hk]; run c: heads bounds[c]..

        q (B, H, Sq, D), k and v (B, Hk, Sk, D) with any strides but the last (1); H a multiple
        of Hk (grouped queries); mask broadcast to (B, H, Sq, Sk); out (B, Sq, H, D).
        """
        batch, heads, sq, d = q.shape
        kv_heads, sk = k.shape[1], k.shape[2]
        group = heads // kv_heads
        whole = sk // LANES  # key vectors with no padding lane
        padded = -(-sk // LANES) * LANES
        qs, ks, vs, ms = q.strides, k.strides, v.strides, mask.strides
        flat_out = out.reshape(-1)
        for c in numba.prange(bounds.shape[0] - 1):
            kt = aligned_f32(d * padded)
            s = aligned_f32(BLOCK_ROWS * padded)
            qoff, soff = np.empty(SCORE_ROWS, np.int64), np.empty(SCORE_ROWS, np.int64)
            ones = np.ones(SCORE_ROWS, np.float32)  # not read: scores are stored unscaled (the softmax scales them)
            poff = np.empty(rows_per_pass, np.int64)
            ooff = np.empty(rows_per_pass, np.int64)
            inv = np.empty(BLOCK_ROWS, np.float32)
            part = np.empty(rows_per_pass, np.float32)
            for unit in range(bounds[c], bounds[c + 1]):
                b, h = unit // heads, unit % heads
                hk = h // group
                k_base, k_row = (b * ks[0] + hk * ks[1]) // 4, ks[2] // 4
                for j0 in range(0, whole * LANES, LANES):  # 16 x 16 blocks transposed in registers
                    for e0 in range(0, d, LANES):
                        transpose(k, kt, kt, kt, k_base + j0 * k_row + e0, k_row, e0 * padded + j0, padded, 0, LANES)
                for j in range(whole * LANES, sk):
                    for e in range(d):
                        kt[e * padded + j] = k[b, hk, j, e]
                for j in range(sk, padded):
                    for e in range(d):
                        kt[e * padded + j] = 0.0
                q_base = (b * qs[0] + h * qs[1]) // 4
                v_base = (b * vs[0] + hk * vs[1]) // 4
                for i0 in range(0, sq, BLOCK_ROWS):
                    for r0 in range(0, BLOCK_ROWS, SCORE_ROWS):
                        for r in range(SCORE_ROWS):
                            qoff[r] = q_base + min(i0 + r0 + r, sq - 1) * (qs[2] // 4)
                        for j0 in range(0, padded, SCORE_VECTORS * LANES):  # 64 keys at a time, then the rest
                            for r in range(SCORE_ROWS):
                                soff[r] = (r0 + r) * padded + j0
                            left = min(SCORE_VECTORS, (padded - j0) // LANES)
                            if left == 4:
                                four(q, kt, s, qoff, soff, ones, d, j0, padded)
                            elif left == 3:
                                three(q, kt, s, qoff, soff, ones, d, j0, padded)
                            elif left == 2:
                                two(q, kt, s, qoff, soff, ones, d, j0, padded)
                            else:
                                one(q, kt, s, qoff, soff, ones, d, j0, padded)
                    rows = min(BLOCK_ROWS, sq - i0)
                    for r in range(rows):
                        at = r * padded
                        mo = (b * ms[0] + h * ms[1] + (i0 + r) * ms[2]) // mask.itemsize
                        if mask_kind == ADD:
                            top = scale_add(s, mask, at, mo, whole, scale)
                            for j in range(whole * LANES, sk):
                                s[at + j] = s[at + j] * scale + mask[b, h, i0 + r, j]
                        elif mask_kind == KEEP:
                            top = scale_keep(s, mask, at, mo, whole, scale)
                            for j in range(whole * LANES, sk):
                                s[at + j] = s[at + j] * scale if mask[b, h, i0 + r, j] else -np.inf
                        else:
                            top = scale_only(s, mask, at, 0, whole, scale)
                            for j in range(whole * LANES, sk):
                                s[at + j] = s[at + j] * scale
                        for j in range(whole * LANES, sk):
                            top = max(top, s[at + j])
                        for j in range(sk, padded):
                            s[at + j] = -np.inf
                        inv[r] = 1.0 / exp_rows(s, at, padded // LANES, top)
                    for p0 in range(0, rows, rows_per_pass):
                        for r in range(rows_per_pass):
                            row = min(p0 + r, rows - 1)
                            poff[r] = row * padded
                            ooff[r] = ((b * sq + i0 + row) * heads + h) * d
                            part[r] = inv[row]
                        values(s, v, flat_out, poff, ooff, part, sk, v_base, vs[2] // 4)

    return attend
