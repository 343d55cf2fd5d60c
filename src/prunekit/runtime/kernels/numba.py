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

Threads: the parallel kernels use numba's OpenMP pool with a bounded spin (else workqueue) unless
`NUMBA_THREADING_LAYER` says otherwise (see `numba_setup.prefer_openmp`); the single-threaded
kernels (`parallel=False`, the `*_1t` candidates) need no pool at all.

These kernels take the ``csr``, ``bsr`` and ``nm24`` formats; ``nm24r`` has its own (`avx512`),
and `prunekit.runtime.kernels.bind` picks between them by format.

Batch layout: batch 1 uses x as a vector. Larger batches are cut into tiles of 8 rows stored
(tile, in * 8): the 8 values of one input feature are adjacent, and each output row keeps its 8
accumulators in one AVX register while it walks its non-zeros once per tile. Values
may be float32 or int8; int8 rows are multiplied by their fp32 scale once per output row.
"""

from __future__ import annotations

import types
from collections.abc import Callable
from typing import Any

import numpy as np

from prunekit.runtime.kernels.numba_setup import import_numba, prefer_openmp

TILE = 8  # batch rows per tile in the batched kernels (one AVX2 vector of fp32)

_KERNELS: dict[bool, dict[str, Any]] | None = None


def kernels(parallel: bool = True) -> dict[str, Any]:
    """The compiled kernels by name, built (or loaded from numba's cache) on first use.

    Both a parallel (`prange` over output rows, numba's thread pool) and a single-threaded set
    exist: waking the pool costs microseconds on an idle machine but a scheduler time slice
    (milliseconds) on an overloaded one, where the single-threaded kernels win; `accelerate`
    measures both. Call them through `bind` (or `sparse_linear`): it compiles them (on first use,
    then numba's disk cache) with LLVM's SLP vectorizer on, which the batched kernels rely on.
    """
    global _KERNELS
    if _KERNELS is None:
        numba = import_numba()
        prefer_openmp(numba)
        _KERNELS = {True: _build(numba, True), False: _build(numba, False)}
    return _KERNELS[parallel]


# The batched kernels keep one tile's 8 accumulators as a tuple; LLVM's SLP vectorizer (enabled
# for these kernels by `call_with_lane_vectorizer`) turns each 8-lane step into one AVX FMA. These
# helpers are plain Python until `_build` compiles them into the globals the kernels see: as
# closure variables they would defeat numba's disk cache, which hashes a closure's pickled
# contents, and a numba function pickles with a per-process id (a recompile in every process).
_ZERO = np.float32(0.0)


def _axpy8(a, v, xs, c):  # pragma: no cover - compiled
    """a + v * xs[c : c + 8], lane by lane."""
    return (a[0] + v * xs[c], a[1] + v * xs[c + np.uint64(1)], a[2] + v * xs[c + np.uint64(2)],
            a[3] + v * xs[c + np.uint64(3)], a[4] + v * xs[c + np.uint64(4)], a[5] + v * xs[c + np.uint64(5)],
            a[6] + v * xs[c + np.uint64(6)], a[7] + v * xs[c + np.uint64(7)])


def _pair8(a, v, c, w, d, xs):  # pragma: no cover - compiled
    """a + (v * xs[c : c + 8] + w * xs[d : d + 8]): two non-zeros, one dependent add per lane."""
    z = _ZERO
    p = _axpy8(_axpy8((z, z, z, z, z, z, z, z), v, xs, c), w, xs, d)
    return (a[0] + p[0], a[1] + p[1], a[2] + p[2], a[3] + p[3], a[4] + p[4], a[5] + p[5], a[6] + p[6], a[7] + p[7])


def _store8(yr, a, s, bi):  # pragma: no cover - compiled
    for j in range(8):
        yr[j] = a[j] * s + bi


def _build(numba: Any, parallel: bool) -> dict[str, Any]:
    prange = numba.prange
    env: dict[str, Any] = dict(globals())

    def njit(fastmath: Any = False, **opts: Any) -> Any:
        def wrap(fn: Any) -> Any:
            # Compiled with `env` as globals, where the helpers' names are numba functions.
            copy = types.FunctionType(fn.__code__, env, fn.__name__, fn.__defaults__, fn.__closure__)
            copy.__qualname__ = fn.__qualname__
            if not parallel:
                # numba's on-disk cache is keyed by qualified name and signature, not by flags:
                # the serial twin needs a name of its own.
                copy.__qualname__ += "_serial"
            return numba.njit(fastmath=fastmath, **opts)(copy)

        return wrap

    lanes = njit(inline="always", fastmath={"contract"})
    for helper in (_axpy8, _pair8, _store8):
        env[helper.__name__] = lanes(helper)

    # No reassociating fastmath where x is indexed by a stored column: it lets LLVM vectorize the
    # non-zero loop with AVX-512 gathers, which we measured 2-3x slower on Zen 4 than scalar loads
    # with several independent accumulators. "contract" (fused multiply-add) is safe: it changes
    # no loop's order. BSR's contiguous block rows do vectorize well, so `bsr_b1` keeps fastmath.
    # Indices are uint64: numba wraps negative signed indices around (a compare and a cmov per
    # load), which doubled the instructions per non-zero.
    opts: dict[str, Any] = {"parallel": parallel, "cache": True, "nogil": True, "fastmath": {"contract"}}
    u1, u2, u4, width = np.uint64(1), np.uint64(2), np.uint64(4), np.uint64(TILE)
    zero = _ZERO

    @njit(**opts)
    def csr_b1(rowptr, cols, vals, scales, bias, x, y):  # pragma: no cover - compiled
        for r in prange(rowptr.shape[0] - 1):
            a0 = a1 = a2 = a3 = zero
            k, end = np.uint64(rowptr[r]), np.uint64(rowptr[r + 1])
            while k + u4 <= end:
                a0 += np.float32(vals[k]) * x[cols[k]]
                a1 += np.float32(vals[k + u1]) * x[cols[k + u1]]
                a2 += np.float32(vals[k + u2]) * x[cols[k + u2]]
                a3 += np.float32(vals[k + np.uint64(3)]) * x[cols[k + np.uint64(3)]]
                k += u4
            while k < end:
                a0 += np.float32(vals[k]) * x[cols[k]]
                k += u1
            y[r] = ((a0 + a1) + (a2 + a3)) * scales[r] + bias[r]

    @njit(**opts)
    def csr_tiles(rowptr, cols, vals, scales, bias, xt, yt):  # pragma: no cover - compiled
        for r in prange(rowptr.shape[0] - 1):
            start, end = np.uint64(rowptr[r]), np.uint64(rowptr[r + 1])
            for t in range(xt.shape[0]):
                xs, a, k = xt[t], (zero, zero, zero, zero, zero, zero, zero, zero), start
                while k + u2 <= end:
                    a = _pair8(a, np.float32(vals[k]), np.uint64(cols[k]) * width,
                               np.float32(vals[k + u1]), np.uint64(cols[k + u1]) * width, xs)
                    k += u2
                if k < end:
                    a = _axpy8(a, np.float32(vals[k]), xs, np.uint64(cols[k]) * width)
                _store8(yt[t, r], a, scales[r], bias[r])

    @njit(**{**opts, "fastmath": True})
    def bsr_b1(browptr, bcols, vals, scales, bias, x, y):  # pragma: no cover - compiled
        br, bc = vals.shape[1], vals.shape[2]
        for i in prange(browptr.shape[0] - 1):
            for r in range(br):
                acc = zero
                for k in range(browptr[i], browptr[i + 1]):
                    c0 = np.int64(bcols[k]) * bc
                    for j in range(bc):
                        acc += np.float32(vals[k, r, j]) * x[c0 + j]
                y[i * br + r] = acc * scales[i * br + r] + bias[i * br + r]

    @njit(**opts)
    def bsr_tiles(browptr, bcols, vals, scales, bias, xt, yt):  # pragma: no cover - compiled
        br, bc = vals.shape[1], np.uint64(vals.shape[2])
        for i in prange(browptr.shape[0] - 1):
            for t in range(xt.shape[0]):
                xs = xt[t]
                for r in range(br):
                    a = (zero, zero, zero, zero, zero, zero, zero, zero)
                    for k in range(browptr[i], browptr[i + 1]):
                        c0, v = np.uint64(bcols[k]) * bc, vals[k, r]
                        j = np.uint64(0)
                        while j + u1 < bc:
                            a = _pair8(a, np.float32(v[j]), (c0 + j) * width, np.float32(v[j + u1]),
                                       (c0 + j + u1) * width, xs)
                            j += u2
                        if j < bc:
                            a = _axpy8(a, np.float32(v[j]), xs, (c0 + j) * width)
                    _store8(yt[t, i * br + r], a, scales[i * br + r], bias[i * br + r])

    @njit(**opts)
    def nm24_b1(vals, idx, scales, bias, x, y):  # pragma: no cover - compiled
        # 2:4: vals (out, in/2) holds the two kept values of each group of 4 inputs; idx (out, in/4)
        # holds their positions in the group, 2 bits each (bits 0-1 and 2-3).
        for r in prange(vals.shape[0]):
            v, m = vals[r], idx[r]
            a0 = a1 = zero
            for g in range(np.uint64(m.shape[0])):
                bits, base = np.uint64(m[g]), g * u4
                a0 += np.float32(v[g * u2]) * x[base + (bits & np.uint64(3))]
                a1 += np.float32(v[g * u2 + u1]) * x[base + ((bits >> u2) & np.uint64(3))]
            y[r] = (a0 + a1) * scales[r] + bias[r]

    @njit(**opts)
    def nm24_tiles(vals, idx, scales, bias, xt, yt):  # pragma: no cover - compiled
        for r in prange(vals.shape[0]):
            v, m = vals[r], idx[r]
            for t in range(xt.shape[0]):
                xs, a = xt[t], (zero, zero, zero, zero, zero, zero, zero, zero)
                for g in range(np.uint64(m.shape[0])):
                    bits, base = np.uint64(m[g]), g * u4
                    a = _pair8(a, np.float32(v[g * u2]), (base + (bits & np.uint64(3))) * width,
                               np.float32(v[g * u2 + u1]), (base + ((bits >> u2) & np.uint64(3))) * width, xs)
                _store8(yt[t, r], a, scales[r], bias[r])

    return {
        "csr_b1": csr_b1,
        "csr_tiles": csr_tiles,
        "bsr_b1": bsr_b1,
        "bsr_tiles": bsr_tiles,
        "nm24_b1": nm24_b1,
        "nm24_tiles": nm24_tiles,
    }


def call_with_lane_vectorizer(config: Any, kernel: Any, *args: Any) -> None:
    """Call `kernel` with LLVM's SLP vectorizer allowed, in case this call compiles it.

    numba keeps SLP off by default; it is what turns the 8 per-lane accumulators of the batched
    kernels into one AVX register (2-2.5x fewer instructions per non-zero, measured). numba
    switched it off after a miscompilation elsewhere (numba#8705); `tests/runtime/test_kernels.py`
    checks every kernel against `F.linear`. Compilation happens on a kernel's first call with a
    given signature, hence the switch around every call (two attribute writes, not a context
    manager: this runs ~200 times per decoded token). `config` is numba's `core.config`.
    """
    before, config.SLP_VECTORIZE = config.SLP_VECTORIZE, 1
    try:
        kernel(*args)
    finally:
        config.SLP_VECTORIZE = before


def _to_tiles(x: np.ndarray) -> np.ndarray:
    """(n, in) -> (ceil(n / 8), in * 8), zero-padded: one input feature's 8 batch values adjacent."""
    n, in_f = x.shape
    tiles = -(-n // TILE)
    if n % TILE:  # pad; whole tiles skip this copy
        x = np.concatenate([x, np.zeros((tiles * TILE - n, in_f), np.float32)])
    return np.ascontiguousarray(x.reshape(tiles, TILE, in_f).transpose(0, 2, 1)).reshape(tiles, in_f * TILE)


def bind(packed: Any, bias: np.ndarray, *, parallel: bool = True) -> Callable[[np.ndarray], np.ndarray]:
    """``run(x) -> x @ W.T + bias`` for a ``csr``, ``bsr`` or ``nm24`` weight, kernels and arguments looked up once.

    x is a C-contiguous float32 (n, in) array. This is the per-call path of the runtime's modules:
    decoding calls ~200 layers a token, and every lookup skipped here is a microsecond saved.
    """
    k = kernels(parallel)
    out_f = packed.shape[0]
    if packed.kind == "nm24":
        args: tuple[Any, ...] = (packed.values, packed.cols, packed.scales, bias)
    else:
        args = (packed.rowptr, packed.cols, packed.values, packed.scales, bias)
    b1, tiles = k[f"{packed.kind}_b1"], k[f"{packed.kind}_tiles"]
    config = import_numba().core.config  # looked up once, not on every call

    def run(x: np.ndarray) -> np.ndarray:
        n = x.shape[0]
        if n == 1:
            y = np.empty((1, out_f), np.float32)
            call_with_lane_vectorizer(config, b1, *args, x[0], y[0])
            return y
        yt = np.empty((-(-n // TILE), out_f, TILE), np.float32)
        call_with_lane_vectorizer(config, tiles, *args, _to_tiles(x), yt)
        return yt.transpose(0, 2, 1).reshape(-1, out_f)[:n]

    return run

