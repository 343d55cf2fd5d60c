"""Sparse weights times many dense rows (batch 16-128, or the tokens of a sequence): rows as vector lanes.

The small-batch kernels (`kernels.numba`) walk each output row's non-zeros once per 8 rows of x;
past batch 8 they reload every non-zero many times. Here x is transposed into tiles of `TILE`
(32) rows, xt (tiles, in, 32), so its rows are lanes: one non-zero w[o, k] costs a broadcast and
two FMAs per tile, ``acc[o, lanes] += w[o, k] * xt[tile, k, lanes]``.

What keeps the FMAs fed (2-core Zen 4 here; `benchmarks/cpu_sparse_layers.py --ffn-stack`):

- **Panels of inputs in L1.** The inputs are cut into panels of `PANEL` (128) columns, 16 KB of a
  tile of xt; a block of `BLOCK` (64) output rows keeps its sums (8 KB) in L1 while it walks one
  panel's non-zeros, so every x load hits L1. Column indices within a panel fit a byte.
- **Groups of `GROUP` (4) output rows in lock-step (sliced ELLPACK).** Within a block and a panel,
  rows are sorted by their count of non-zeros and taken four at a time, the shorter ones padded
  with zero weights to the group's longest (~3 % more FMAs at 90 % sparsity). One loop carries
  eight independent accumulators and ends once per group instead of once per row. The loop is
  LLVM IR (`_group_codegen`): per non-zero one index byte, one broadcast and two FMAs.
- **Two ways to share the work between threads**, both in equal shares of stored entries (not of
  blocks: pruned rows differ in length), both with each thread transposing the tiles of x it
  reads into its own buffer (a tile one core wrote and the other read cost 25-60 us a layer, and
  this is one parallel launch, not two). A weight that fits in L2 (`CACHED_WEIGHT_BYTES`) is
  shared by tiles of x (`by_tiles`); a larger one by blocks of output rows (`by_blocks`: each
  thread reads its part of the weight from memory once, and transposes every tile).
- **Transposes in registers.** x goes into tiles and the sums come back into y (n, out) 16 x 16 at a
  time through vector shuffles (`ir_transpose`); strided scalar copies cost ~1 ns an element
  here and took half the time of a 3072 x 768 layer at batch 64.

Values are fp32, or int8 with one fp32 scale per output row (weight-only INT8: x and the
accumulators stay fp32, the scale is applied once per output row). The weight is re-packed once,
when the kernel is bound (at install time). The IR uses generic 16-lane vectors, so any x86 CPU
runs it (AVX-512: one register per vector; AVX2: two). `spmm_vnni` runs the same layout and loop
on int8 weights in 1 x 4 blocks with x quantized too (``op="vnni"``: int32 sums, AVX-512 VNNI).
"""

from __future__ import annotations

from collections.abc import Callable
from functools import cache
from typing import Any

import numpy as np

from prunekit.runtime.kernels import numba as small
from prunekit.runtime.kernels.buffers import aligned_allocator, aligned_empty
from prunekit.runtime.kernels.ir_loops import close_accumulator_loop
from prunekit.runtime.kernels.ir_transpose import transpose_intrinsic
from prunekit.runtime.kernels.numba_setup import import_numba, prefer_openmp

LANES = 16  # rows of x per vector (one AVX-512 register of fp32)
TILE = 32  # rows of x per pass: two vectors per output row
PANEL = 128  # input columns per panel: 128 x 32 floats = 16 KB of xt in L1; columns fit a byte
GROUP = 4  # output rows walked in lock-step
BLOCK = 64  # output rows per unit of work (rows are sorted into groups within a block)
SMALL_BATCH = 8  # batches up to this size run the small-batch kernels of `kernels.numba`
BLOCK_COST = 1500  # a block's fixed cost in stored entries (~1.2 us a block and tile against ~0.8 ns an entry)
CACHED_WEIGHT_BYTES = 512 * 1024  # packed weights up to this size stay in each core's L2 (1 MB here): split by tiles


def _group_codegen(vectors: int, op: str, lanes: int = LANES) -> Callable[..., Any]:
    """One group (LLVM IR): ``acc[row_g][: 16 v] += sum_j vals[s + G j + g] * x[cols[s + G j + g] * width :][: 16 v]``.

    Arguments (vals, cols, x, acc, members, start, steps, width, m0, xo): the group's values and
    column bytes are interleaved (step j holds the G rows' j-th non-zero); the panel starts at
    x[xo] (columns `width` lanes apart); member g is ``members[m0 + g]``, a row of the block (its
    sums at ``acc[row * width]``) or `BLOCK` for padding, which lands in acc's extra row `BLOCK`.
    The G x `vectors` accumulators of `lanes` elements (16, or 8 where x has only 8 rows left) are
    loaded from acc, carried in registers, stored back. `op` is what one step multiplies: "f32"
    (fp32 values, FMA), "int8" (int8 values widened to fp32, FMA) or "vnni" (an int32 value holds
    4 int8 weights of 4 adjacent inputs, a lane of x holds those inputs as 4 uint8, acc is int32:
    VNNI's ``vpdpbusd`` adds the 4 products per lane).
    """
    from llvmlite import ir

    f32, i32 = ir.FloatType(), ir.IntType(32)
    vnni = op == "vnni"
    vec = ir.VectorType(i32 if vnni else f32, lanes)

    def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
        start, steps, width, m0, xo = args[5:10]
        pv, pc, px, pa, pm = (
            context.make_array(t)(context, builder, a).data for t, a in zip(signature.args[:5], args[:5], strict=True)
        )
        name = f"llvm.x86.avx512.vpdpbusd.{32 * lanes}" if vnni else f"llvm.fma.v{lanes}f32"
        mac = builder.module.globals.get(name) or ir.Function(builder.module, ir.FunctionType(vec, [vec] * 3), name)
        intp = start.type

        def const(value: int) -> Any:
            return ir.Constant(intp, value)

        def vector_at(base: Any, offset: Any) -> Any:
            return builder.bitcast(builder.gep(base, [offset]), vec.as_pointer())

        acc = []
        for g in range(GROUP):
            row = builder.sext(builder.load(builder.gep(pm, [builder.add(m0, const(g))])), intp)
            acc += [vector_at(pa, builder.add(builder.mul(row, width), const(lanes * i))) for i in range(vectors)]
        initial = [builder.load(p, align=4) for p in acc]
        entry = builder.block
        loop, done = builder.append_basic_block("group.loop"), builder.append_basic_block("group.done")
        end = builder.add(start, builder.mul(steps, const(GROUP)))
        builder.cbranch(builder.icmp_signed("<", start, end), loop, done)

        builder.position_at_end(loop)
        k = builder.phi(intp)
        carried = [builder.phi(vec) for _ in initial]
        step_type = ir.VectorType(ir.IntType(8) if op == "int8" else vec.element, GROUP)
        values = builder.load(builder.bitcast(builder.gep(pv, [k]), step_type.as_pointer()),
                              align=1 if op == "int8" else 4)
        if op == "int8":
            values = builder.sitofp(values, ir.VectorType(f32, GROUP))
        updated = []
        for g in range(GROUP):
            col = builder.zext(builder.load(builder.gep(pc, [builder.add(k, const(g))])), intp)
            pick = ir.Constant(ir.VectorType(i32, lanes), [g] * lanes)
            splat = builder.shuffle_vector(values, ir.Constant(values.type, ir.Undefined), pick)
            base = builder.add(xo, builder.mul(col, width))
            for i in range(vectors):
                x = builder.load(vector_at(px, builder.add(base, const(lanes * i))), align=4)
                total = carried[g * vectors + i]
                updated.append(builder.call(mac, [total, x, splat] if vnni else [splat, x, total]))
        following = builder.add(k, const(GROUP))
        close_accumulator_loop(builder, blocks=(entry, loop, done), counter=(k, start, following),
                               again=builder.icmp_signed("<", following, end),
                               accumulators=(carried, initial, updated), destinations=acc)
        return context.get_dummy_value()

    return codegen


@cache
def kernels() -> dict[str, Any]:
    """The compiled kernels by name: ``spmm`` / ``spmm_int8`` / ``spmm_vnni`` (by blocks, by tiles), ``pack_weight``."""
    numba = import_numba()
    prefer_openmp(numba)
    from numba import types
    from numba.extending import intrinsic

    def group_intrinsic(vectors: int, op: str, lanes: int = LANES) -> Any:
        @intrinsic
        def group(typingctx, vals, cols, x, acc, members, start, steps, width, m0, xo):  # type: ignore[no-untyped-def]  # pragma: no cover - compiled
            return types.void(vals, cols, x, acc, members, *[types.intp] * 5), _group_codegen(vectors, op, lanes)

        return group

    store_tile, copy_tile = transpose_intrinsic(True), transpose_intrinsic(False)
    aligned_f32 = aligned_allocator()

    @numba.njit(nogil=True, cache=True)
    def pack_tile(x, t0, tile):  # pragma: no cover - compiled
        """tile[k * TILE + lane] = x[t0 + lane, k], zero past x's last row: 16 x 16 blocks transposed in registers."""
        n, in_f = x.shape
        whole, xs = in_f - in_f % LANES, x.reshape(-1)
        for l0 in range(0, TILE, LANES):
            r0 = t0 + l0
            rows = min(LANES, n - r0)
            if rows == LANES:
                for k0 in range(0, whole, LANES):
                    copy_tile(xs, tile, xs, xs, r0 * in_f + k0, in_f, k0 * TILE + l0, TILE, 0, LANES)  # no scale, bias
                for k in range(whole, in_f):
                    for lane in range(LANES):
                        tile[k * TILE + l0 + lane] = x[r0 + lane, k]
            else:
                for k in range(in_f):
                    for lane in range(LANES):
                        tile[k * TILE + l0 + lane] = x[r0 + lane, k] if lane < rows else 0.0

    def driver(op: str) -> Any:
        wide, narrow, half = group_intrinsic(TILE // LANES, op), group_intrinsic(1, op), group_intrinsic(1, op, 8)
        vnni, size = op == "vnni", (BLOCK + 1) * TILE  # sums of a block's rows, + the scratch row

        if vnni:
            @numba.njit(nogil=True, cache=True)
            def buffers():  # pragma: no cover - compiled
                """int32 sums, and their fp32 values once the zero point and x's row scales are applied."""
                return np.empty(size, np.int32), np.empty(size, np.float32)
        else:
            @numba.njit(nogil=True, cache=True)
            def buffers():  # pragma: no cover - compiled
                acc = np.empty(size, np.float32)
                return acc, acc

        @numba.njit(nogil=True, cache=True)
        def one_block(  # pragma: no cover - compiled
            meta, members, cols, vals, scales, bias, xs, at, t0, blk, y, acc, out, row_sums, x_scales
        ):
            """y's rows t0 .. t0 + TILE of block blk's outputs, from the tile of x's rows t0.. at xs[at:] (in x TILE).

            y is (siblings, n, width): output o of the layer is column o % width of sibling o // width
            (one layer: y is (n, out) with a leading 1; fused siblings: each its own contiguous array).

            A block's sums (64 rows x 32 lanes, 8 KB) and a panel of x (16 KB) stay in L1 while
            the block's groups for that panel run. With VNNI, x holds uint8 (x's int8 + 128):
            ``(sum - 128 * row_sums[o]) * x_scales[lane]`` is the fp32 sum (`out`); otherwise `out` is `acc`.
            """
            n, width = y.shape[1], y.shape[2]
            out_f = y.shape[0] * width
            panels, groups, flat = meta.shape[1], meta.shape[2], members.reshape(-1)
            o0 = blk * BLOCK
            rows = min(out_f, o0 + BLOCK) - o0
            acc[:] = 0
            for p in range(panels):
                xo = at + p * PANEL * TILE
                for g in range(groups):
                    start, steps = meta[blk, p, g, 0], meta[blk, p, g, 1]
                    if steps > 0:
                        m0 = ((blk * panels + p) * groups + g) * GROUP
                        if n - t0 > LANES:
                            wide(vals, cols, xs, acc, flat, start, steps, TILE, m0, xo)
                        elif n - t0 > 8:  # the last rows fit one vector: skip the padding lanes
                            narrow(vals, cols, xs, acc, flat, start, steps, TILE, m0, xo)
                        else:  # or half of one
                            half(vals, cols, xs, acc, flat, start, steps, TILE, m0, xo)
            lanes, ys, whole = min(TILE, n - t0), y.reshape(-1), rows - rows % LANES
            if vnni:
                for r in range(rows):
                    zero = 128 * row_sums[o0 + r]
                    for lane in range(TILE):
                        out[r * TILE + lane] = (acc[r * TILE + lane] - zero) * x_scales[t0 + lane]
            for r in range(0, whole, LANES):  # 16 x 16 blocks transposed in registers
                o = o0 + r
                m = o // width  # 16 outputs never straddle two siblings: width is a multiple of 16 when fused
                for l0 in range(0, lanes, LANES):
                    store_tile(out, ys, scales, bias, r * TILE + l0, TILE, (m * n + t0 + l0) * width + o - m * width,
                               width, o, lanes - l0)
            for lane in range(lanes):
                for r in range(whole, rows):
                    o = o0 + r
                    m = o // width
                    y[m, t0 + lane, o - m * width] = out[r * TILE + lane] * scales[o] + bias[o]

        @numba.njit(nogil=True, cache=True, parallel=True)
        def by_blocks(meta, members, cols, vals, scales, bias, x, y, bounds, row_sums, x_scales):  # pragma: no cover
            """y (n, out) = x @ W.T * scales + bias; run c takes blocks ``bounds[c] ..``, every tile of x.

            A run walks its blocks tile by tile: its share of the weight stays in L2 across tiles
            and is read from memory once (a weight larger than the caches: the DRAM regime). Each
            run transposes every tile of x into its own buffer: twice the transposing, but a tile
            one core wrote and the other read cost more (1.05-1.7x per layer at 16-128 rows).
            """
            in_f = x.shape[1]
            for c in numba.prange(bounds.shape[0] - 1):
                if bounds[c] < bounds[c + 1]:
                    acc, out = buffers()
                    tile = aligned_f32(in_f * TILE)
                    for t0 in range(0, x.shape[0], TILE):
                        pack_tile(x, t0, tile)
                        for blk in range(bounds[c], bounds[c + 1]):
                            one_block(meta, members, cols, vals, scales, bias, tile, 0, t0, blk, y, acc, out,
                                      row_sums, x_scales)

        @numba.njit(nogil=True, cache=True, parallel=True)
        def by_tiles(meta, members, cols, vals, scales, bias, x, y, units, row_sums, x_scales):  # pragma: no cover
            """y (n, out) = x @ W.T * scales + bias; run c takes the (tile, block) units ``units[c] ..``, tile-major.

            Each run transposes the tiles of x it needs into its own buffer: nothing one core wrote
            is read by the other (moving a freshly written x tile between cores cost 25-60 us a
            call), and one parallel launch instead of two. The weight is read by every run: for
            weights that fit in L2.
            """
            blocks, in_f = meta.shape[0], x.shape[1]
            for c in numba.prange(units.shape[0] - 1):
                if units[c] < units[c + 1]:
                    acc, out = buffers()
                    tile = aligned_f32(in_f * TILE)  # 64-byte aligned: unsplit 512-bit loads
                    current = -1
                    for u in range(units[c], units[c + 1]):
                        t, blk = u // blocks, u % blocks
                        if t != current:
                            pack_tile(x, t * TILE, tile)
                            current = t
                        one_block(meta, members, cols, vals, scales, bias, tile, 0, t * TILE, blk, y, acc, out,
                                  row_sums, x_scales)

        return by_blocks, by_tiles

    @numba.njit(nogil=True, cache=True)
    def pack_weight(rowptr, cols, vals, in_f, meta, members, out_cols, out_vals):  # pragma: no cover - compiled
        """CSR -> blocks x panels x groups of `GROUP` rows (sorted by length, zero-padded); returns the length used."""
        out_f = rowptr.shape[0] - 1
        pos = 0
        cursor = np.empty(BLOCK, np.int64)  # each row's next non-zero (CSR columns ascend, so panels come in order)
        counts = np.empty(BLOCK, np.int64)
        for blk in range(meta.shape[0]):
            o0 = blk * BLOCK
            rows = min(out_f, o0 + BLOCK) - o0
            for r in range(rows):
                cursor[r] = rowptr[o0 + r]
            for p in range(meta.shape[1]):
                k1 = min(in_f, (p + 1) * PANEL)
                counts[:] = 0
                for r in range(rows):
                    j = cursor[r]
                    while j + counts[r] < rowptr[o0 + r + 1] and cols[j + counts[r]] < k1:
                        counts[r] += 1
                order = np.argsort(-counts[:rows], kind="mergesort")
                for g in range(meta.shape[2]):
                    steps = 0
                    for i in range(GROUP):
                        j = g * GROUP + i
                        members[blk, p, g, i] = order[j] if j < rows else BLOCK  # BLOCK: padding, the scratch row
                        if j < rows:
                            steps = max(steps, counts[order[j]])
                    meta[blk, p, g, 0], meta[blk, p, g, 1] = pos, steps
                    for i in range(GROUP):
                        r = members[blk, p, g, i]
                        have = counts[r] if r < BLOCK else 0
                        for s in range(steps):
                            at = pos + s * GROUP + i
                            if s < have:
                                out_cols[at] = cols[cursor[r] + s] - p * PANEL
                                out_vals[at] = vals[cursor[r] + s]
                            else:
                                out_cols[at] = 0
                                out_vals[at] = 0
                    pos += steps * GROUP
                for r in range(rows):
                    cursor[r] += counts[r]
        return pos

    return {"spmm": driver("f32"), "spmm_int8": driver("int8"), "spmm_vnni": driver("vnni"),
            "pack_weight": pack_weight}


class SparseMatmul:
    """``x @ W.T`` for one ``csr`` weight (fp32 or int8) in the panelled, grouped layout above, packed once.

    Calls take a C-contiguous float32 x (n, in) and return y (n, out); x is transposed into tiles
    on the way in and y out of them, both in registers.
    """

    siblings = 1  # outputs split into this many equal, separately contiguous arrays (fused sibling layers)

    def __init__(self, packed: Any, bias: np.ndarray, siblings: int = 1) -> None:
        if packed.kind != "csr":
            raise ValueError(f"the many-row kernel takes the 'csr' format, got {packed.kind!r}")
        out_f = packed.shape[0]
        if siblings < 1 or out_f % siblings or (siblings > 1 and (out_f // siblings) % LANES):
            raise ValueError(f"{out_f} outputs do not split into {siblings} siblings of a multiple of {LANES}")
        self.siblings = siblings
        self._layout(packed.rowptr, packed.cols, packed.values, packed.shape[1], packed, bias)
        self._spmm = kernels()["spmm_int8" if packed.int8 else "spmm"]
        self._unused = np.zeros(1, np.int32), np.zeros(1, np.float32)  # row sums, x's scales: VNNI only

    def _layout(self, rowptr: np.ndarray, cols: np.ndarray, values: np.ndarray, columns: int, packed: Any,
                bias: np.ndarray) -> None:
        """Re-pack CSR arrays over `columns` inputs into blocks x panels x groups (`pack_weight`)."""
        out_f = packed.shape[0]
        k, numba = kernels(), import_numba()
        blocks, panels, groups = -(-out_f // BLOCK), max(1, -(-columns // PANEL)), BLOCK // GROUP
        self.meta = np.zeros((blocks, panels, groups, 2), np.int64)
        self.members = np.zeros((blocks, panels, groups, GROUP), np.int16)
        # rows sorted by length pad a block's panel by < GROUP * PANEL entries; this allows 8x that (trimmed below)
        capacity = values.size + blocks * panels * groups * GROUP * (PANEL // 2)
        packed_cols, packed_vals = np.zeros(capacity, np.uint8), np.zeros(capacity, values.dtype)
        used = k["pack_weight"](rowptr.astype(np.int64), cols.astype(np.int64), values, columns, self.meta,
                                self.members, packed_cols, packed_vals)
        self.cols, self.vals = packed_cols[: used + GROUP].copy(), packed_vals[: used + GROUP].copy()
        self.scales, self.bias = packed.scales.astype(np.float32), np.ascontiguousarray(bias, np.float32)
        self.shape, self.nonzeros = packed.shape, int(np.count_nonzero(values))
        self._config, self._threads = numba.core.config, numba.get_num_threads
        # a block's work: its stored entries, plus the fixed cost of a block (sums zeroed, transposed out)
        self._work = self.meta[..., 1].sum(axis=(1, 2)) * GROUP + BLOCK_COST
        self._in_cache = self.cols.nbytes + self.vals.nbytes <= CACHED_WEIGHT_BYTES
        self._splits: dict[tuple[int, int], np.ndarray] = {}

    def split(self, tiles: int, runs: int) -> np.ndarray:
        """Where `runs` parallel runs split the work: run c takes units ``split[c] .. split[c + 1] - 1``.

        A unit is a block (the weight split between runs) or, with `tiles` > 0, a (tile, block)
        pair, tile-major. Shares are equal in work, not in units: magnitude pruning leaves rows with
        very unequal counts (MiniLM's query and key layers at 90 %: one half of the blocks holds
        1.4-1.5x the other's non-zeros), and the slower run sets the layer's time.
        """
        key = (tiles, runs)
        if key not in self._splits:
            done = np.concatenate([[0], np.cumsum(np.tile(self._work, max(tiles, 1)))])  # work before each unit
            shares = done[-1] * np.arange(1, runs) / runs
            inner = [int(np.abs(done - share).argmin()) for share in shares]  # the nearest boundary
            self._splits[key] = np.array([0, *inner, len(done) - 1], np.int64)
        return self._splits[key]

    @property
    def padding(self) -> float:
        """Stored entries per non-zero, minus one: the zeros that pad each group to its longest row."""
        return int(self.meta[..., 1].sum()) * GROUP / max(self.nonzeros, 1) - 1.0

    def _run(self, x: np.ndarray, row_sums: np.ndarray, x_scales: np.ndarray) -> np.ndarray:
        """y (n, out), or (siblings, n, out / siblings), from x (n, columns) as lanes: tiled, multiplied, transposed.

        A weight that fits in L2 is split between the threads by tiles of x (each transposes its
        own); a larger one by blocks of output rows, so it is read from memory once.
        """
        n, runs = x.shape[0], self._threads()
        tiles = -(-n // TILE)
        y = aligned_empty((self.siblings, n, self.shape[0] // self.siblings))  # 64-byte aligned: unsplit 512-bit stores
        by_blocks, by_tiles = self._spmm
        if self._in_cache and tiles >= runs:
            kernel, split = by_tiles, self.split(tiles, runs)
        else:
            kernel, split = by_blocks, self.split(0, runs)
        small.call_with_lane_vectorizer(
            self._config, kernel, self.meta, self.members, self.cols, self.vals, self.scales, self.bias, x, y, split,
            row_sums, x_scales,
        )
        return y if self.siblings > 1 else y.reshape(n, self.shape[0])

    def __call__(self, x: np.ndarray) -> np.ndarray:
        """y (n, out) = x @ W.T * scales + bias for a C-contiguous float32 x (n, in); (siblings, n, width) if split."""
        return self._run(x, *self._unused)


def bind(
    packed: Any, bias: np.ndarray, *, parallel: bool = True, siblings: int = 1
) -> Callable[[np.ndarray], np.ndarray]:
    """``run(x) -> x @ W.T + bias`` (C-contiguous) for a ``csr`` weight, rows as lanes above `SMALL_BATCH` rows.

    Up to `SMALL_BATCH` rows run `kernels.numba`'s kernels (with `parallel`); the many-row kernel
    always uses numba's thread pool. With `siblings` > 1 (fused layers of equal width) y comes
    back as (siblings, n, width): each one's outputs contiguous past `SMALL_BATCH` rows (up to
    it, a strided view of the small-batch kernel's (n, out)).
    """
    few, many = small.bind(packed, bias, parallel=parallel), SparseMatmul(packed, bias, siblings)
    if siblings == 1:
        return lambda x: few(x) if x.shape[0] <= SMALL_BATCH else many(x)
    width = packed.shape[0] // siblings

    def run(x: np.ndarray) -> np.ndarray:
        if x.shape[0] > SMALL_BATCH:
            return many(x)
        return few(x).reshape(x.shape[0], siblings, width).transpose(1, 0, 2)

    return run
