"""2:4 INT8 at batch 1 with AVX-512 permutes: 16 output rows per vector, no per-weight index decode.

The scalar 2:4 kernel (`kernels_numba`) decodes two 2-bit positions and loads x twice per group
and row: 0.5x of fbgemm's dense INT8 here. This one keeps 16 rows in the lanes of a register
(`formats.pack_nm24_rows`): per group of 4 inputs it broadcasts x[4g : 4g + 4] into a table,
turns the 16 rows' positions into two lane indices and picks each row's inputs with one
`vpermps` (`llvm.x86.avx512.permvar.sf.512`) per kept value, then two FMAs. LLVM does not emit
a variable permute from plain code, so the group step is a numba `intrinsic` written in LLVM IR.

Measured at batch 1, weights from DRAM (SmolLM2's 576->1536 / 1536->576 / 576->576): the kernel
alone 65 / 45 / 26 us against fbgemm's dynamic INT8 at 93 / 85 / 53 us (both 1 thread); through
the `nn.Module` (tensor <-> array, output allocation) 68 / 72 / 42 us against fbgemm with 2
threads at 81 / 83 / 60 us. A `prange` twin was slower (150 us: waking a second pool per call),
so there is none. Needs a CPU with AVX-512F (`available()`); `accelerate` only offers it there.
"""

from __future__ import annotations

from functools import cache
from typing import Any

import numpy as np

from prunekit.errors import PrunekitError
from prunekit.runtime.kernels_numba import _import_numba

LANES = 16


@cache
def available() -> bool:
    """Whether this CPU has AVX-512F (what the permute and the 16-lane FMAs need)."""
    try:
        from llvmlite import binding
    except ImportError:  # pragma: no cover - numba (and llvmlite) missing
        return False
    return bool(binding.get_host_cpu_features().get("avx512f", False))


@cache
def _kernel() -> Any:
    numba = _import_numba()
    from llvmlite import ir
    from numba import types
    from numba.extending import intrinsic

    f32, i32, i8 = ir.FloatType(), ir.IntType(32), ir.IntType(8)
    v16f, v16i, v16b, v4f = (ir.VectorType(f32, 16), ir.VectorType(i32, 16), ir.VectorType(i8, 16),
                             ir.VectorType(f32, 4))

    def declared(module: Any, name: str, fn_type: Any) -> Any:
        return module.globals.get(name) or ir.Function(module, fn_type, name)

    @intrinsic
    def group16(typingctx, vals, idx, x, acc, vo, io, xo):  # pragma: no cover - compiled
        """acc[0:16] += vals[vo:vo+16] * x[xo + p0] + vals[vo+16:vo+32] * x[xo + p1], p from idx[io:io+16]."""
        sig = types.void(vals, idx, x, acc, types.intp, types.intp, types.intp)

        def codegen(context, builder, signature, args):
            vo, io, xo = args[4:]
            arrays = zip(signature.args[:4], args[:4], strict=True)
            pv, pi, px, pa = (context.make_array(t)(context, builder, a).data for t, a in arrays)
            perm = declared(builder.module, "llvm.x86.avx512.permvar.sf.512", ir.FunctionType(v16f, [v16f, v16i]))
            fma = declared(builder.module, "llvm.fma.v16f32", ir.FunctionType(v16f, [v16f, v16f, v16f]))

            def load(ptr, offset, ty, align):
                return builder.load(builder.bitcast(builder.gep(ptr, [offset]), ty.as_pointer()), align=align)

            x4 = load(px, xo, v4f, 4)
            table = builder.shuffle_vector(x4, x4, ir.Constant(v16i, [0, 1, 2, 3] * 4))
            positions = builder.zext(load(pi, io, v16b, 1), v16i)
            three, two = ir.Constant(v16i, [3] * 16), ir.Constant(v16i, [2] * 16)
            first = builder.call(perm, [table, builder.and_(positions, three)])
            second = builder.call(perm, [table, builder.and_(builder.lshr(positions, two), three)])
            v0 = builder.sitofp(builder.sext(load(pv, vo, v16b, 1), v16i), v16f)
            v1 = builder.sitofp(builder.sext(load(pv, builder.add(vo, ir.Constant(vo.type, 16)), v16b, 1), v16i), v16f)
            acc_ptr = builder.bitcast(pa, v16f.as_pointer())
            total = builder.call(fma, [v1, second, builder.call(fma, [v0, first, builder.load(acc_ptr, align=4)])])
            builder.store(total, acc_ptr, align=4)
            return context.get_dummy_value()

        return sig, codegen

    @numba.njit(nogil=True, cache=True)
    def nm24r_b1(vals, idx, scales, bias, x, y):  # pragma: no cover - compiled
        groups = x.shape[0] // 4
        acc = np.zeros(2 * LANES, np.float32)  # two accumulators: even and odd groups
        for b in range(y.shape[0] // LANES):
            acc[:] = 0.0
            base = b * groups
            g = 0
            while g + 1 < groups:
                group16(vals, idx, x, acc[:LANES], (base + g) * 32, (base + g) * 16, g * 4)
                group16(vals, idx, x, acc[LANES:], (base + g + 1) * 32, (base + g + 1) * 16, (g + 1) * 4)
                g += 2
            if g < groups:
                group16(vals, idx, x, acc[:LANES], (base + g) * 32, (base + g) * 16, g * 4)
            for lane in range(LANES):
                r = b * LANES + lane
                y[r] = (acc[lane] + acc[LANES + lane]) * scales[r] + bias[r]

    return nm24r_b1


def nm24r_linear(packed: Any, x: np.ndarray, bias: np.ndarray) -> np.ndarray:
    """y = x @ W.T + bias for an ``nm24r`` weight and float32 (n, in) x, one row of x at a time."""
    if not available():
        raise PrunekitError("the nm24r kernel needs a CPU with AVX-512F; this one has none: use the 'nm24' format")
    kernel = _kernel()
    y = np.empty((x.shape[0], packed.shape[0]), np.float32)
    for i in range(x.shape[0]):
        kernel(packed.values, packed.cols, packed.scales, bias, np.ascontiguousarray(x[i]), y[i])
    return y
