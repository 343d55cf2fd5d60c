"""prunekit's own sparse x dense kernels for small batches (1-8 rows), compiled by numba.

Why these formats: at batch 1-8 a Linear layer is bound by the bytes of its weights, and
`torch.sparse.mm` with CSR (fp32 values + int64 indices, 12 bytes per non-zero) runs at a
fraction of the bandwidth. Here a non-zero costs 6 bytes (fp32 + uint16 column) or 3 bytes
(int8 + uint16) in CSR, and a block of R x C non-zeros costs 4*R*C (or R*C) bytes plus one uint16
in BSR. Work is split over output rows with `prange`, so every thread owns its rows and no
reduction is needed.

Why numba: it installs as a wheel from the package registry (extra `speed`), needs no compiler
on the user's machine and emits code for the CPU it runs on (AVX-512 here). It is imported only
when a kernel is first used, so `import prunekit` stays light; `cache=True` keeps the compiled
code across processes.

Threads: the parallel kernels use numba's workqueue pool (see `_prefer_workqueue`), which does
not take launches from several Python threads at once; call one model from one thread, or use
the single-threaded kernels (`parallel=False`, the `*_1t` candidates).

Batch layout: batch 1 uses x as a vector. Larger batches are cut into tiles of 8 rows stored
(tile, in, 8): the 8 values of one input feature share one cache line, and each output row keeps
8 accumulators in registers while it walks its non-zeros once per tile. Values
may be float32 or int8; int8 rows are multiplied by their fp32 scale once per output row.
"""

from __future__ import annotations

import types
from typing import Any

import numpy as np

from prunekit.errors import PrunekitError

TILE = 8  # batch rows per tile in the batched kernels (one AVX2 vector of fp32)

_KERNELS: dict[bool, dict[str, Any]] | None = None


def _import_numba() -> Any:
    try:
        import numba
    except ImportError:  # pragma: no cover - depends on the environment
        raise PrunekitError(
            "prunekit's sparse CPU kernels need numba, which is not installed; "
            "install it with: pip install 'prunekit[speed]'"
        ) from None
    return numba


def kernels(parallel: bool = True) -> dict[str, Any]:
    """The compiled kernels by name, built (or loaded from numba's cache) on first use.

    Both a parallel (`prange` over output rows, numba's thread pool) and a single-threaded set
    exist: waking the pool costs microseconds on an idle machine but a scheduler time slice
    (milliseconds) on an overloaded one, where the single-threaded kernels win; `accelerate`
    measures both.
    """
    global _KERNELS
    if _KERNELS is None:
        numba = _import_numba()
        _prefer_workqueue(numba)
        _KERNELS = {True: _build(numba, True), False: _build(numba, False)}
    return _KERNELS[parallel]


def _prefer_workqueue(numba: Any) -> None:
    """Use numba's workqueue thread pool unless the user chose a threading layer.

    numba's default here is OpenMP, whose idle workers spin; so do torch's own OpenMP workers
    (a separate libgomp). Alternating torch ops and numba kernels then leaves four spinning
    threads fighting over two cores: we measured a 0.7 ms kernel taking 24 ms and torch's dense
    `F.linear` 30x slower. workqueue's workers sleep on a semaphore instead.
    """
    import os

    if "NUMBA_THREADING_LAYER" not in os.environ:
        numba.config.THREADING_LAYER = "workqueue"


def _build(numba: Any, parallel: bool) -> dict[str, Any]:
    prange = numba.prange

    def njit(fastmath: bool = False, **opts: Any) -> Any:
        def wrap(fn: Any) -> Any:
            if not parallel:
                # numba's on-disk cache is keyed by qualified name and signature, not by flags:
                # the serial twin needs a name of its own.
                fn = types.FunctionType(fn.__code__, fn.__globals__, fn.__name__, fn.__defaults__, fn.__closure__)
                fn.__qualname__ += "_serial"
            return numba.njit(fastmath=fastmath, **opts)(fn)

        return wrap

    # No fastmath where x is indexed by a stored column: it lets LLVM vectorize the non-zero loop
    # with AVX-512 gathers, which we measured 2-3x slower on Zen 4 than scalar loads with several
    # independent accumulators (written out by hand below for that reason). BSR's contiguous
    # block rows do vectorize well, so the BSR batch-1 kernel keeps fastmath.
    opts = {"parallel": parallel, "cache": True, "nogil": True}

    @njit(**opts)
    def csr_b1(rowptr, cols, vals, scales, bias, x, y):  # pragma: no cover - compiled
        for r in prange(rowptr.shape[0] - 1):
            a0 = a1 = a2 = a3 = np.float32(0.0)
            k, end = rowptr[r], rowptr[r + 1]
            while k + 4 <= end:
                a0 += np.float32(vals[k]) * x[cols[k]]
                a1 += np.float32(vals[k + 1]) * x[cols[k + 1]]
                a2 += np.float32(vals[k + 2]) * x[cols[k + 2]]
                a3 += np.float32(vals[k + 3]) * x[cols[k + 3]]
                k += 4
            while k < end:
                a0 += np.float32(vals[k]) * x[cols[k]]
                k += 1
            y[r] = ((a0 + a1) + (a2 + a3)) * scales[r] + bias[r]

    @njit(**opts)
    def csr_tiles(rowptr, cols, vals, scales, bias, xt, yt):  # pragma: no cover - compiled
        for r in prange(rowptr.shape[0] - 1):
            s, bi = scales[r], bias[r]
            for t in range(xt.shape[0]):
                xs = xt[t]
                a0 = a1 = a2 = a3 = a4 = a5 = a6 = a7 = np.float32(0.0)
                for k in range(rowptr[r], rowptr[r + 1]):
                    v, c = np.float32(vals[k]), cols[k]
                    a0 += v * xs[c, 0]
                    a1 += v * xs[c, 1]
                    a2 += v * xs[c, 2]
                    a3 += v * xs[c, 3]
                    a4 += v * xs[c, 4]
                    a5 += v * xs[c, 5]
                    a6 += v * xs[c, 6]
                    a7 += v * xs[c, 7]
                yr = yt[t, r]
                yr[0], yr[1], yr[2], yr[3] = a0 * s + bi, a1 * s + bi, a2 * s + bi, a3 * s + bi
                yr[4], yr[5], yr[6], yr[7] = a4 * s + bi, a5 * s + bi, a6 * s + bi, a7 * s + bi

    @njit(fastmath=True, **opts)
    def bsr_b1(browptr, bcols, vals, scales, bias, x, y):  # pragma: no cover - compiled
        br, bc = vals.shape[1], vals.shape[2]
        for i in prange(browptr.shape[0] - 1):
            for r in range(br):
                acc = np.float32(0.0)
                for k in range(browptr[i], browptr[i + 1]):
                    c0 = np.int64(bcols[k]) * bc
                    for j in range(bc):
                        acc += np.float32(vals[k, r, j]) * x[c0 + j]
                y[i * br + r] = acc * scales[i * br + r] + bias[i * br + r]

    @njit(**opts)
    def bsr_tiles(browptr, bcols, vals, scales, bias, xt, yt):  # pragma: no cover - compiled
        br, bc = vals.shape[1], vals.shape[2]
        for i in prange(browptr.shape[0] - 1):
            for t in range(xt.shape[0]):
                xs = xt[t]
                for r in range(br):
                    a0 = a1 = a2 = a3 = a4 = a5 = a6 = a7 = np.float32(0.0)
                    for k in range(browptr[i], browptr[i + 1]):
                        c0 = np.int64(bcols[k]) * bc
                        for j in range(bc):
                            v, c = np.float32(vals[k, r, j]), c0 + j
                            a0 += v * xs[c, 0]
                            a1 += v * xs[c, 1]
                            a2 += v * xs[c, 2]
                            a3 += v * xs[c, 3]
                            a4 += v * xs[c, 4]
                            a5 += v * xs[c, 5]
                            a6 += v * xs[c, 6]
                            a7 += v * xs[c, 7]
                    row = i * br + r
                    s, bi = scales[row], bias[row]
                    yr = yt[t, row]
                    yr[0], yr[1], yr[2], yr[3] = a0 * s + bi, a1 * s + bi, a2 * s + bi, a3 * s + bi
                    yr[4], yr[5], yr[6], yr[7] = a4 * s + bi, a5 * s + bi, a6 * s + bi, a7 * s + bi

    @njit(**opts)
    def nm24_b1(vals, idx, scales, bias, x, y):  # pragma: no cover - compiled
        # 2:4: vals (out, in/2) holds the two kept values of each group of 4 inputs; idx (out, in/4)
        # holds their positions in the group, 2 bits each (bits 0-1 and 2-3).
        for r in prange(vals.shape[0]):
            a0 = a1 = np.float32(0.0)
            for g in range(idx.shape[1]):
                m = np.int64(idx[r, g])
                a0 += np.float32(vals[r, 2 * g]) * x[4 * g + (m & 3)]
                a1 += np.float32(vals[r, 2 * g + 1]) * x[4 * g + ((m >> 2) & 3)]
            y[r] = (a0 + a1) * scales[r] + bias[r]

    @njit(**opts)
    def nm24_tiles(vals, idx, scales, bias, xt, yt):  # pragma: no cover - compiled
        for r in prange(vals.shape[0]):
            s, bi = scales[r], bias[r]
            for t in range(xt.shape[0]):
                xs = xt[t]
                a0 = a1 = a2 = a3 = a4 = a5 = a6 = a7 = np.float32(0.0)
                for g in range(idx.shape[1]):
                    m = np.int64(idx[r, g])
                    for slot in range(2):
                        v, c = np.float32(vals[r, 2 * g + slot]), 4 * g + ((m >> (2 * slot)) & 3)
                        a0 += v * xs[c, 0]
                        a1 += v * xs[c, 1]
                        a2 += v * xs[c, 2]
                        a3 += v * xs[c, 3]
                        a4 += v * xs[c, 4]
                        a5 += v * xs[c, 5]
                        a6 += v * xs[c, 6]
                        a7 += v * xs[c, 7]
                yr = yt[t, r]
                yr[0], yr[1], yr[2], yr[3] = a0 * s + bi, a1 * s + bi, a2 * s + bi, a3 * s + bi
                yr[4], yr[5], yr[6], yr[7] = a4 * s + bi, a5 * s + bi, a6 * s + bi, a7 * s + bi

    return {
        "csr_b1": csr_b1,
        "csr_tiles": csr_tiles,
        "bsr_b1": bsr_b1,
        "bsr_tiles": bsr_tiles,
        "nm24_b1": nm24_b1,
        "nm24_tiles": nm24_tiles,
    }


def _to_tiles(x: np.ndarray) -> np.ndarray:
    """(n, in) -> (ceil(n / 8), in, 8), zero-padded: one input feature's 8 batch values adjacent."""
    n, in_f = x.shape
    tiles = -(-n // TILE)
    padded = np.zeros((tiles * TILE, in_f), np.float32)
    padded[:n] = x
    return np.ascontiguousarray(padded.reshape(tiles, TILE, in_f).transpose(0, 2, 1))


def sparse_linear(packed: Any, x: np.ndarray, bias: np.ndarray, *, parallel: bool = True) -> np.ndarray:
    """y = x @ W.T + bias for a `formats.PackedWeight` W and a float32 (n, in) array x; returns (n, out)."""
    k = kernels(parallel)
    n = x.shape[0]
    out_f = packed.shape[0]
    if packed.kind == "nm24":
        args: tuple[Any, ...] = (packed.values, packed.cols, packed.scales, bias)
    else:
        args = (packed.rowptr, packed.cols, packed.values, packed.scales, bias)
    if n == 1:
        y = np.empty(out_f, np.float32)
        k[f"{packed.kind}_b1"](*args, np.ascontiguousarray(x[0]), y)
        return y.reshape(1, out_f)
    yt = np.empty((-(-n // TILE), out_f, TILE), np.float32)
    k[f"{packed.kind}_tiles"](*args, _to_tiles(x), yt)
    return yt.transpose(0, 2, 1).reshape(-1, out_f)[:n]
