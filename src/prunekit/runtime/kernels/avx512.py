"""2:4 INT8 at batch 1 with AVX-512 permutes: 16 output rows per vector, no per-weight index decode.

The scalar 2:4 kernel (`kernels.numba`) decodes two 2-bit positions and loads x twice per group
and row: 0.5x of fbgemm's dense INT8 here. This one keeps 16 rows in the lanes of a register
(`formats.pack_nm24_rows`): per group of 4 inputs it broadcasts x[4g : 4g + 4] into a table and
picks each row's input for each kept value with one `vpermps` (`llvm.x86.avx512.permvar.sf.512`)
indexed by the row's stored position, then one FMA. LLVM does not emit a variable permute from
plain code, so the loop over groups is a numba `intrinsic` written in LLVM IR, which also keeps
its four accumulators in registers (numba's arrays would be stored back every step).

Batch 1, weights from DRAM, SmolLM2's 576->1536 / 1536->576 / 576->576 (`benchmarks/
cpu_sparse_layers.py` and RESULTS.md for the comparison with fbgemm): 33 / 32 / 13 us, 17 GB/s
from one core, where the first version (one byte of positions per group, accumulators in memory)
took 36 / 36 / 14 us. Larger batches take x four rows per pass over the weights, decoding each
group's values once: batch 8 costs 4.4x batch 1 (8x before), still 0.5-0.6x of fbgemm's dense
INT8, which multiplies int8 by int8 (VNNI) where this kernel is bound by its permutes. A `prange`
twin was slower (150 us: waking a second pool per call), so there is none. Needs a CPU with
AVX-512F (`available()`); `accelerate` only offers it there.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import cache
from typing import Any

import numpy as np

from prunekit.errors import PrunekitError
from prunekit.runtime.kernels.ir_loops import close_accumulator_loop
from prunekit.runtime.kernels.numba_setup import cpu_has, import_numba, prefer_openmp

LANES = 16
ROWS = 4  # rows of x per pass over the weights


@cache
def available() -> bool:
    """Whether this CPU has AVX-512F (what the permute and the 16-lane FMAs need)."""
    return cpu_has("avx512f")


@cache
def _kernel() -> dict[bool, Any]:
    numba = import_numba()
    prefer_openmp(numba)  # the same threading layer as prunekit's other parallel kernels
    from llvmlite import ir
    from numba import types
    from numba.extending import intrinsic

    f32, i32, i8 = ir.FloatType(), ir.IntType(32), ir.IntType(8)
    v16f, v16i, v16b, v4f = (ir.VectorType(f32, 16), ir.VectorType(i32, 16), ir.VectorType(i8, 16),
                             ir.VectorType(f32, 4))

    def declared(module: Any, name: str, fn_type: Any) -> Any:
        return module.globals.get(name) or ir.Function(module, fn_type, name)

    def codegen_steps(groups: int, rows: int) -> Any:
        """Code for a loop of `n` steps of `groups` (1 or 2) groups of 4 inputs, 16 output rows, `rows` rows of x.

        Per step: one byte of positions per output row (both groups' 4-bit fields, the first group
        in the low nibble) and `groups` * 2 runs of 16 int8 values, decoded once and used for each
        of the `rows` rows of x (row i at x[xo + i * xstride:], this step's inputs 4 * groups * step
        further on). Each (row of x, kept-value slot k) pair has its own accumulator, carried in a
        register across the loop and added to acc[(4 * i + k) * 16 :][: 16] at the end. Each
        group's four x values are repeated across the 16 lanes, so `vpermps`, which reads the low
        4 bits of an index, picks x[4g + p] for any bits above p's two: positions need no masks.
        """
        slots = 2 * groups

        def codegen(context, builder, signature, args):
            vo, io, xo, n, xstride = args[4:]
            arrays = zip(signature.args[:4], args[:4], strict=True)
            pv, pi, px, pa = (context.make_array(t)(context, builder, a).data for t, a in arrays)
            perm = declared(builder.module, "llvm.x86.avx512.permvar.sf.512", ir.FunctionType(v16f, [v16f, v16i]))
            fma = declared(builder.module, "llvm.fma.v16f32", ir.FunctionType(v16f, [v16f, v16f, v16f]))
            intp = vo.type

            def const(value: int) -> Any:
                return ir.Constant(intp, value)

            def load(ptr, offset, ty, align):
                return builder.load(builder.bitcast(builder.gep(ptr, [offset]), ty.as_pointer()), align=align)

            acc_base = builder.bitcast(pa, v16f.as_pointer())
            acc = [builder.gep(acc_base, [ir.Constant(i32, 4 * i + k)]) for i in range(rows) for k in range(slots)]
            start = [builder.load(a, align=4) for a in acc]
            entry = builder.block
            loop, done = builder.append_basic_block("nm24r.loop"), builder.append_basic_block("nm24r.done")
            builder.cbranch(builder.icmp_signed(">", n, const(0)), loop, done)

            builder.position_at_end(loop)
            step = builder.phi(intp)
            carried = [builder.phi(v16f) for _ in acc]
            positions = builder.zext(load(pi, builder.add(io, builder.mul(step, const(16))), v16b, 1), v16i)
            values = builder.add(vo, builder.mul(step, const(32 * groups)))
            indices, weights = [], []
            for k in range(slots):
                indices.append(builder.lshr(positions, ir.Constant(v16i, [2 * k] * 16)) if k else positions)
                weight = builder.sext(load(pv, builder.add(values, const(16 * k)), v16b, 1), v16i)
                weights.append(builder.sitofp(weight, v16f))
            updated = []
            for i in range(rows):
                xs = builder.add(builder.add(xo, builder.mul(const(i), xstride)), builder.mul(step, const(4 * groups)))
                tables = []
                for g in range(groups):
                    x4 = load(px, builder.add(xs, const(4 * g)), v4f, 4)
                    tables.append(builder.shuffle_vector(x4, x4, ir.Constant(v16i, [0, 1, 2, 3] * 4)))
                for k in range(slots):
                    picked = builder.call(perm, [tables[k // 2], indices[k]])
                    updated.append(builder.call(fma, [weights[k], picked, carried[i * slots + k]]))
            following = builder.add(step, const(1))
            close_accumulator_loop(builder, blocks=(entry, loop, done), counter=(step, const(0), following),
                                   again=builder.icmp_signed("<", following, n),
                                   accumulators=(carried, start, updated), destinations=acc)
            return context.get_dummy_value()

        return codegen

    def steps_intrinsic(groups: int, rows: int) -> Any:
        @intrinsic
        def steps(typingctx, vals, idx, x, acc, vo, io, xo, n, xstride):  # pragma: no cover - compiled
            sig = types.void(vals, idx, x, acc, *[types.intp] * 5)
            return sig, codegen_steps(groups, rows)

        return steps

    # rows of x per pass over the weights: 4 rows x 4 slots = 16 accumulators, half the registers
    pairs1, pairs2, pairs3, pairs4 = (steps_intrinsic(2, r) for r in range(1, ROWS + 1))
    single1, single2, single3, single4 = (steps_intrinsic(1, r) for r in range(1, ROWS + 1))

    @numba.njit(nogil=True, cache=True)
    def row_block(vals, idx, scales, bias, x, y, acc, b):  # pragma: no cover - compiled
        """y[:, 16b : 16b + 16] for every row of x."""
        n, in_f = x.shape
        groups = in_f // 4
        pairs = (groups + 1) // 2
        odd = groups % 2
        vbase, pbase = b * groups * 32, b * pairs * 16
        tail = (vbase + (groups - 1) * 32, pbase + (pairs - 1) * 16, (groups - 1) * 4)
        for first in range(0, n, ROWS):
            m = min(ROWS, n - first)
            acc[:] = 0.0
            xo = first * in_f
            if m == 4:
                pairs4(vals, idx, x, acc, vbase, pbase, xo, groups // 2, in_f)
                if odd:
                    single4(vals, idx, x, acc, tail[0], tail[1], xo + tail[2], 1, in_f)
            elif m == 3:
                pairs3(vals, idx, x, acc, vbase, pbase, xo, groups // 2, in_f)
                if odd:
                    single3(vals, idx, x, acc, tail[0], tail[1], xo + tail[2], 1, in_f)
            elif m == 2:
                pairs2(vals, idx, x, acc, vbase, pbase, xo, groups // 2, in_f)
                if odd:
                    single2(vals, idx, x, acc, tail[0], tail[1], xo + tail[2], 1, in_f)
            else:
                pairs1(vals, idx, x, acc, vbase, pbase, xo, groups // 2, in_f)
                if odd:
                    single1(vals, idx, x, acc, tail[0], tail[1], xo + tail[2], 1, in_f)
            for i in range(m):
                a = acc[i * 4 * LANES : (i + 1) * 4 * LANES]
                for lane in range(LANES):
                    r = b * LANES + lane
                    total = a[lane] + a[LANES + lane] + a[2 * LANES + lane] + a[3 * LANES + lane]
                    y[first + i, r] = total * scales[r] + bias[r]

    @numba.njit(nogil=True, cache=True)
    def nm24r(vals, idx, scales, bias, x, y):  # pragma: no cover - compiled
        acc = np.zeros(ROWS * 4 * LANES, np.float32)  # (row of x, value slot of a pair, lane)
        for b in range(y.shape[1] // LANES):
            row_block(vals, idx, scales, bias, x, y, acc, b)

    @numba.njit(nogil=True, cache=True, parallel=True)
    def nm24r_parallel(vals, idx, scales, bias, x, y, chunks):  # pragma: no cover - compiled
        blocks = y.shape[1] // LANES
        for c in numba.prange(chunks):  # contiguous runs of row blocks (one per thread), one accumulator each
            acc = np.zeros(ROWS * 4 * LANES, np.float32)
            for b in range(c * blocks // chunks, (c + 1) * blocks // chunks):
                row_block(vals, idx, scales, bias, x, y, acc, b)

    return {False: nm24r, True: nm24r_parallel}


def bind_nm24r(packed: Any, bias: np.ndarray, *, parallel: bool = False) -> Callable[[np.ndarray], np.ndarray]:
    """``run(x) -> x @ W.T + bias`` for an ``nm24r`` weight and a C-contiguous float32 (n, in) x.

    `parallel` splits the output rows over numba's threads: worth it only where launching them is
    cheap (numba's OpenMP layer, prunekit's default, whose idle workers spin a while: ~2 us here,
    against ~80 us for the workqueue layer); `accelerate` measures both.
    """
    if not available():
        raise PrunekitError("the nm24r kernel needs a CPU with AVX-512F; this one has none: use the 'nm24' format")
    kernel, args, out_f = _kernel()[parallel], (packed.values, packed.cols, packed.scales, bias), packed.shape[0]
    threads = import_numba().get_num_threads

    def run(x: np.ndarray) -> np.ndarray:
        y = np.empty((x.shape[0], out_f), np.float32)
        if parallel:
            kernel(*args, x, y, threads())
        else:
            kernel(*args, x, y)
        return y

    return run
