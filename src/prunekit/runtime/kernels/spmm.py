"""Sparse weights times many dense rows (batch 16-128, or the tokens of a sequence): rows as vector lanes.

The small-batch kernels (`kernels.numba`) walk each output row's non-zeros once per tile of 8
rows of x, with x packed (tile, in * 8): past batch 8 they reload every non-zero many times and
torch's CSR wins. Here x is transposed once per call to xt (in, n_pad), so the rows of x are the
lanes: for an output row o and a tile of 64 rows of x, four 16-lane accumulators (four AVX-512
registers) take ``acc += w[o, j] * xt[col[j], b0 : b0 + 64]`` for each non-zero j: one
broadcast of the value and four FMAs reading x straight from cache, so each non-zero is loaded
once per 64 rows and x's tile (in x 64 floats, 196 KB for in = 768) stays in L2. Results are
stored (via a buffer in L1) into y (n, out) directly, so there is no transpose back.

Work split: `prange` over blocks of `ROW_BLOCK` output rows (numba's workqueue pool, see
`numba_setup.prefer_workqueue`); within a block the tiles of x are the outer loop, so the block's
non-zeros (<= 60 KB for in = 3072 at 90 %) are read from DRAM once and then from L2. Tiles are
64 rows wide, the last ones 32 or 16 (x padded with zero rows to a multiple of 16).

Formats: ``csr`` with fp32 values, or int8 values with one fp32 scale per output row
(weight-only INT8: x and the accumulators stay fp32, the scale is applied once per output row);
`formats.pack_csr` makes both. Batches of at most `SMALL_BATCH` rows go to the small-batch
kernels, which waste no lanes there. The loops are plain numba (LLVM's SLP vectorizer makes the
16-lane tuples vectors), so any CPU runs them: AVX-512 gives 16-lane FMAs, AVX2 two 8-lane ones.
"""

from __future__ import annotations

import types
from collections.abc import Callable
from typing import Any

import numpy as np

from prunekit.runtime.kernels import numba as small
from prunekit.runtime.kernels.numba_setup import import_numba, prefer_workqueue

LANES = 16  # rows of x per accumulator (one AVX-512 register of fp32)
TILE = 64  # rows of x per pass over a block of output rows: four accumulators
ROW_BLOCK = 32  # output rows per work item of `prange`
PACK_INPUTS = 128  # inputs per slab when transposing x (128 x 64 floats: 32 KB, in L1)
SMALL_BATCH = 8  # batches up to this size run the small-batch kernels of `kernels.numba`

_KERNELS: dict[str, Any] | None = None

# The loops below are plain Python until `kernels` compiles them: each is copied with a globals
# table in which the helpers' names are numba functions (and `prange` is numba's). No closures:
# numba keys its disk cache on a closure's pickled contents, which hold a per-process id for every
# numba function, so closures over helpers recompile in every process (~10 s here).
_U = tuple(np.uint64(i) for i in range(TILE))  # uint64 index arithmetic: numba makes uint64 + int64 a float
_Z = np.float32(0.0)
_ZEROS = (_Z,) * LANES
prange = range  # numba.prange once compiled


def kernels() -> dict[str, Any]:
    """The compiled many-row kernels by name (``spmm``, ``pack``), built or loaded from numba's cache on first use."""
    global _KERNELS
    if _KERNELS is None:
        numba = import_numba()
        prefer_workqueue(numba)
        env = {**globals(), "prange": numba.prange}

        def jit(fn: Any, **opts: Any) -> Any:
            copy = types.FunctionType(fn.__code__, env, fn.__name__, fn.__defaults__)
            copy.__qualname__ = fn.__qualname__
            env[fn.__name__] = numba.njit(fastmath={"contract"}, **opts)(copy)
            return env[fn.__name__]

        for helper in (_axpy, _add, _store):
            jit(helper, inline="always")
        for row in (_row64, _row32, _row16):  # inlined by LLVM: numba's parfor pass rejects tuples of tuples
            jit(row, cache=True)
        spmm = jit(_spmm, parallel=True, cache=True, nogil=True)
        _KERNELS = {"spmm": spmm, "pack": jit(_pack, cache=True, nogil=True)}
    return _KERNELS


def _axpy(a, v, xs, c):  # pragma: no cover - compiled
    """a + v * xs[c : c + 16], lane by lane (one vector FMA after SLP vectorization)."""
    u = _U
    return (a[0] + v * xs[c], a[1] + v * xs[c + u[1]], a[2] + v * xs[c + u[2]], a[3] + v * xs[c + u[3]],
            a[4] + v * xs[c + u[4]], a[5] + v * xs[c + u[5]], a[6] + v * xs[c + u[6]], a[7] + v * xs[c + u[7]],
            a[8] + v * xs[c + u[8]], a[9] + v * xs[c + u[9]], a[10] + v * xs[c + u[10]],
            a[11] + v * xs[c + u[11]], a[12] + v * xs[c + u[12]], a[13] + v * xs[c + u[13]],
            a[14] + v * xs[c + u[14]], a[15] + v * xs[c + u[15]])


def _add(a, b):  # pragma: no cover - compiled
    return (a[0] + b[0], a[1] + b[1], a[2] + b[2], a[3] + b[3], a[4] + b[4], a[5] + b[5], a[6] + b[6],
            a[7] + b[7], a[8] + b[8], a[9] + b[9], a[10] + b[10], a[11] + b[11], a[12] + b[12],
            a[13] + b[13], a[14] + b[14], a[15] + b[15])


def _store(buf, lane, o, a, s, bi):  # pragma: no cover - compiled
    """buf[lane + j, o] = a[j] * s + bi for the 16 lanes (buf: one tile's rows x one block's outputs, in L1)."""
    for j in range(LANES):
        buf[lane + j, o] = a[j] * s + bi


def _row64(start, end, cols, vals, xs, stride, b0):  # pragma: no cover - compiled
    """One output row times 64 rows of x: four 16-lane accumulators, each non-zero loaded once."""
    u, a0, a1, a2, a3 = _U, _ZEROS, _ZEROS, _ZEROS, _ZEROS
    for k in range(start, end):
        v, c = np.float32(vals[k]), np.uint64(cols[k]) * stride + b0
        a0, a1 = _axpy(a0, v, xs, c), _axpy(a1, v, xs, c + u[16])
        a2, a3 = _axpy(a2, v, xs, c + u[32]), _axpy(a3, v, xs, c + u[48])
    return a0, a1, a2, a3


def _row32(start, end, cols, vals, xs, stride, b0):  # pragma: no cover - compiled
    """One output row times 32 rows of x: two chains per 16 lanes (even and odd non-zeros)."""
    u, a0, a1, a2, a3 = _U, _ZEROS, _ZEROS, _ZEROS, _ZEROS
    k = start
    while k + u[1] < end:
        v, c = np.float32(vals[k]), np.uint64(cols[k]) * stride + b0
        w, d = np.float32(vals[k + u[1]]), np.uint64(cols[k + u[1]]) * stride + b0
        a0, a1 = _axpy(a0, v, xs, c), _axpy(a1, v, xs, c + u[16])
        a2, a3 = _axpy(a2, w, xs, d), _axpy(a3, w, xs, d + u[16])
        k += u[2]
    if k < end:
        v, c = np.float32(vals[k]), np.uint64(cols[k]) * stride + b0
        a0, a1 = _axpy(a0, v, xs, c), _axpy(a1, v, xs, c + u[16])
    return _add(a0, a2), _add(a1, a3)


def _row16(start, end, cols, vals, xs, stride, b0):  # pragma: no cover - compiled
    """One output row times 16 rows of x: four chains, as FMA latency, not throughput, bounds one."""
    u, a0, a1, a2, a3 = _U, _ZEROS, _ZEROS, _ZEROS, _ZEROS
    k = start
    while k + u[3] < end:
        a0 = _axpy(a0, np.float32(vals[k]), xs, np.uint64(cols[k]) * stride + b0)
        a1 = _axpy(a1, np.float32(vals[k + u[1]]), xs, np.uint64(cols[k + u[1]]) * stride + b0)
        a2 = _axpy(a2, np.float32(vals[k + u[2]]), xs, np.uint64(cols[k + u[2]]) * stride + b0)
        a3 = _axpy(a3, np.float32(vals[k + u[3]]), xs, np.uint64(cols[k + u[3]]) * stride + b0)
        k += u[4]
    while k < end:
        a0 = _axpy(a0, np.float32(vals[k]), xs, np.uint64(cols[k]) * stride + b0)
        k += u[1]
    return _add(_add(a0, a1), _add(a2, a3))


def _spmm(rowptr, cols, vals, scales, bias, xt, tiles, y):  # pragma: no cover - compiled
    """y (n, out) = x @ W.T * scales + bias, x given as xt (in, n_pad); tiles: (start, width) rows of x.

    Results go to a small buffer first: storing a lane straight into y would touch one cache line
    per row of y, and with rows 12 KB apart (3072 outputs) all of them map to one L1 set.
    """
    out_f, n, xs, stride = y.shape[1], y.shape[0], xt.reshape(-1), np.uint64(xt.shape[1])
    for blk in prange((out_f + ROW_BLOCK - 1) // ROW_BLOCK):
        o0 = blk * ROW_BLOCK
        rows = min(out_f, o0 + ROW_BLOCK) - o0
        buf = np.empty((TILE, ROW_BLOCK), np.float32)
        for t in range(tiles.shape[0]):
            b0, width = tiles[t, 0], tiles[t, 1]
            ub0 = np.uint64(b0)
            for r in range(rows):
                o = o0 + r
                start, end, s, bi = np.uint64(rowptr[o]), np.uint64(rowptr[o + 1]), scales[o], bias[o]
                if width == TILE:
                    a0, a1, a2, a3 = _row64(start, end, cols, vals, xs, stride, ub0)
                    _store(buf, 0, r, a0, s, bi)
                    _store(buf, 16, r, a1, s, bi)
                    _store(buf, 32, r, a2, s, bi)
                    _store(buf, 48, r, a3, s, bi)
                elif width == 2 * LANES:
                    a0, a1 = _row32(start, end, cols, vals, xs, stride, ub0)
                    _store(buf, 0, r, a0, s, bi)
                    _store(buf, 16, r, a1, s, bi)
                else:
                    _store(buf, 0, r, _row16(start, end, cols, vals, xs, stride, ub0), s, bi)
            for lane in range(min(width, n - b0)):
                y[b0 + lane, o0 : o0 + rows] = buf[lane, :rows]


def _pack(x, xt):  # pragma: no cover - compiled
    """xt[:, :n] = x.T, xt[:, n:] = 0, `PACK_INPUTS` inputs at a time: each row of x is read in runs
    of 512 bytes (a handful of streams for the prefetcher), and the slab of xt written stays in L1."""
    n, in_f = x.shape
    for k0 in range(0, in_f, PACK_INPUTS):
        k1 = min(in_f, k0 + PACK_INPUTS)
        for b in range(n):
            for k in range(k0, k1):
                xt[k, b] = x[b, k]
        for b in range(n, xt.shape[1]):
            for k in range(k0, k1):
                xt[k, b] = _Z


def tile_plan(n: int) -> np.ndarray:
    """Tiles (start row, width) covering n rows of x, int64 (tiles, 2): widths of 64, then 32 and/or 16 at the end.

    The padding stays under 16 rows: 40 rows are 32 + 16, not 64.
    """
    plan, start = [], 0
    while start < n:
        left = n - start
        width = TILE if left > 3 * LANES else (2 * LANES if left > LANES else LANES)
        plan.append((start, width))
        start += width
    return np.array(plan, np.int64).reshape(-1, 2)


def bind(packed: Any, bias: np.ndarray, *, parallel: bool = True) -> Callable[[np.ndarray], np.ndarray]:
    """``run(x) -> x @ W.T + bias`` for a ``csr`` weight (fp32 or int8), rows as lanes above `SMALL_BATCH` rows.

    x is a C-contiguous float32 (n, in) array. Up to `SMALL_BATCH` rows run `kernels.numba`'s
    kernels (with `parallel`); the many-row kernel always uses numba's thread pool.
    """
    if packed.kind != "csr":
        raise ValueError(f"the many-row kernel takes the 'csr' format, got {packed.kind!r}")
    few = small.bind(packed, bias, parallel=parallel)
    k = kernels()
    spmm, pack, config = k["spmm"], k["pack"], import_numba().core.config
    args = (packed.rowptr, packed.cols, packed.values, packed.scales, bias)
    plans: dict[int, np.ndarray] = {}

    def run(x: np.ndarray) -> np.ndarray:
        n = x.shape[0]
        if n <= SMALL_BATCH:
            return few(x)
        plan = plans.get(n)
        if plan is None:
            plan = plans.setdefault(n, tile_plan(n))
        xt = np.empty((x.shape[1], int(plan[-1].sum())), np.float32)
        y = np.empty((n, packed.shape[0]), np.float32)
        pack(x, xt)
        small.call_with_lane_vectorizer(config, spmm, *args, xt, plan, y)
        return y

    return run
