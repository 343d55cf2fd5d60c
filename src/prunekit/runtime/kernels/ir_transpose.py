"""A 16 x 16 block of fp32 transposed in registers (LLVM IR), for the kernels that turn rows into lanes.

The many-row kernel (`spmm`) moves x into tiles and its sums back this way, and the attention
kernel (`attention`) turns each head's keys into lanes. A strided scalar copy costs ~1 ns an
element here (each store to another cache line); this costs ~0.1.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import cache
from typing import Any

LANES = 16


def transpose_codegen(affine: bool) -> Callable[..., Any]:
    """LLVM IR for a 16 x 16 transpose: ``dst[do + j * ds :][: 16] = src[so + i * ss + j]`` over i (x scale + bias).

    Arguments (src, dst, scales, bias, so, ss, do, ds, co, lanes): 16 rows of src are loaded as
    vectors and transposed in registers (four rounds of two-vector shuffles, each swapping one bit
    of the row and lane numbers), then the first `lanes` rows of the result are stored. With
    `affine`, result row j is ``* scales[co :][: 16] + bias[co :][: 16]``. Strided scalar copies
    cost ~1 ns an element here (each store to another cache line); this is ~0.1.
    """
    from llvmlite import ir

    f32, i32 = ir.FloatType(), ir.IntType(32)
    v16f = ir.VectorType(f32, LANES)

    def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
        src, dst, scales, bias = (
            context.make_array(t)(context, builder, a).data for t, a in zip(signature.args[:4], args[:4], strict=True)
        )
        so, ss, do, ds, co, lanes = args[4:10]
        intp = so.type

        def at(base: Any, offset: Any) -> Any:
            return builder.bitcast(builder.gep(base, [offset]), v16f.as_pointer())

        rows = [builder.load(at(src, builder.add(so, builder.mul(ir.Constant(intp, i), ss))), align=4)
                for i in range(LANES)]
        for bit in (8, 4, 2, 1):
            low = [j if j & bit == 0 else LANES + j - bit for j in range(LANES)]
            high = [j + bit if j & bit == 0 else LANES + j for j in range(LANES)]
            for i in range(LANES):
                if i & bit == 0:
                    a, b = rows[i], rows[i + bit]
                    rows[i] = builder.shuffle_vector(a, b, ir.Constant(ir.VectorType(i32, LANES), low))
                    rows[i + bit] = builder.shuffle_vector(a, b, ir.Constant(ir.VectorType(i32, LANES), high))
        if affine:
            scale, shift = builder.load(at(scales, co), align=4), builder.load(at(bias, co), align=4)
            rows = [builder.fadd(builder.fmul(r, scale), shift) for r in rows]
        done = builder.append_basic_block("transpose.done")
        for j in range(LANES):
            store = builder.append_basic_block(f"transpose.row{j}")
            builder.cbranch(builder.icmp_signed(">", lanes, ir.Constant(intp, j)), store, done)
            builder.position_at_end(store)
            builder.store(rows[j], at(dst, builder.add(do, builder.mul(ir.Constant(intp, j), ds))), align=4)
        builder.branch(done)
        builder.position_at_end(done)
        return context.get_dummy_value()

    return codegen


@cache
def transpose_intrinsic(affine: bool) -> Any:
    """The numba intrinsic ``transpose(src, dst, scales, bias, so, ss, do, ds, co, lanes)`` of `transpose_codegen`."""
    from numba import types
    from numba.extending import intrinsic

    @intrinsic
    def transpose(typingctx, src, dst, scales, bias, so, ss, do, ds, co, lanes):  # type: ignore[no-untyped-def]  # pragma: no cover - compiled
        return types.void(src, dst, scales, bias, *[types.intp] * 6), transpose_codegen(affine)

    return transpose
