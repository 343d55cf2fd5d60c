"""INT8 x INT8 sparse times many dense rows with VNNI: the weights in 1 x 4 blocks, x quantized per row.

`spmm`'s layout and loop, with one change of unit: a stored entry is a *quad*, the int8 weights
of 4 adjacent inputs of one output row (a 1 x 4 BSR block, all-zero quads dropped), and a lane of
x holds those 4 inputs of one row as uint8. One ``vpdpbusd`` (AVX-512 VNNI) adds the 4 products
of a quad per lane into int32 sums, so a quad costs what one fp32 non-zero costs in `spmm`: up to
4 multiply-adds per lane for a weight pruned in 1 x 4 blocks (`BlockConfig(block=(1, 4))`), 1.2 for
a random 90 % mask (a third of its quads hold a non-zero), 2 for 2:4.

x is quantized per call, one symmetric scale per row (``max |x[i]| / 127``, as dynamic
quantization does per tensor), and shifted by 128 to uint8 (``vpdpbusd`` multiplies unsigned x by
signed weights); ``128 * sum(w[o])`` is taken back from each sum before the scales. Outputs then
differ from fp32 by the rounding of both operands (~1 %), like fbgemm's dynamic INT8 Linear.
Needs AVX-512 VNNI (`available()`); `accelerate` offers it only there and with INT8 allowed.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import cache
from typing import Any

import numpy as np

from prunekit.errors import PrunekitError
from prunekit.runtime import formats
from prunekit.runtime.kernels import numba as small
from prunekit.runtime.kernels.numba_setup import cpu_has, import_numba
from prunekit.runtime.kernels.spmm import SMALL_BATCH, TILE, SparseMatmul, kernels

QUAD = (1, 4)  # the BSR block this kernel takes: 4 adjacent inputs of one output row


@cache
def available() -> bool:
    """Whether this CPU has AVX-512 VNNI (``vpdpbusd`` on 16 and 8 lanes)."""
    return cpu_has("avx512f", "avx512vl", "avx512vnni")


@cache
def quantizer() -> Any:
    """The compiled per-row quantizer ``quantize_rows(x, bits, q, scales)`` that every call runs on x first.

    `bits` is x viewed as uint32: with the sign bit cleared, the integers order as |x| does, and
    their max is a reduction LLVM vectorizes (a float max is not: 4.7x slower at 64 x 3072).
    """
    numba = import_numba()
    from llvmlite import ir
    from numba import types
    from numba.extending import intrinsic

    @intrinsic
    def as_float32(typingctx, bits):  # type: ignore[no-untyped-def]  # pragma: no cover - compiled
        """The float32 whose bits are `bits` (a bitcast, no memory)."""
        return types.float32(types.uint32), lambda context, builder, signature, args: builder.bitcast(
            args[0], ir.FloatType())

    @numba.njit(nogil=True, cache=True, parallel=True)
    def quantize_rows(x, bits, q, scales):  # pragma: no cover - compiled
        """q[i] = round(x[i] / scales[i]) + 128 as uint8, scales[i] = max |x[i]| / 127 (1 for a zero row)."""
        n, in_f = x.shape
        magnitude = np.uint32(0x7FFFFFFF)
        for i in numba.prange(n):
            top = np.uint32(0)
            for k in range(in_f):
                top = max(top, np.uint32(bits[i, k] & magnitude))
            amax = as_float32(top)
            s = amax / np.float32(127.0) if amax > 0 else np.float32(1.0)
            inv = np.float32(1.0) / s
            for k in range(in_f):  # x / s is within [-127, 127]: + 128.5, truncated, rounds half up
                q[i, k] = np.uint8(np.int32(x[i, k] * inv + np.float32(128.5)))
            scales[i] = s

    return quantize_rows


class QuantizedSparseMatmul(SparseMatmul):
    """``x @ W.T`` for an int8 weight in 1 x 4 blocks (``bsr`` (1, 4) int8), x quantized to int8 per call."""

    def __init__(self, packed: Any, bias: np.ndarray) -> None:
        if not available():
            raise PrunekitError("the VNNI many-row kernel needs a CPU with AVX-512 VNNI; this one has none")
        if packed.kind != "bsr" or tuple(packed.block) != QUAD or not packed.int8:
            raise ValueError(f"the VNNI kernel takes int8 'bsr' 1x4 blocks, got {packed.describe()}")
        quads = np.ascontiguousarray(packed.values).reshape(-1, 4)
        # the 4 int8 weights of a quad as one int32 (little-endian: input 4q + j is byte j)
        self._layout(packed.rowptr, packed.cols, quads.view(np.int32).reshape(-1), packed.shape[1] // 4, packed, bias)
        rows = np.repeat(np.arange(packed.shape[0]), np.diff(packed.rowptr))
        self.row_sums = np.bincount(rows, weights=quads.sum(axis=1, dtype=np.int64),
                                    minlength=packed.shape[0]).astype(np.int32)
        self._spmm, self._quantize = kernels()["spmm_vnni"], quantizer()

    def __call__(self, x: np.ndarray) -> np.ndarray:
        """y (n, out) = dequantized (quantized x) @ W.T * scales + bias for a C-contiguous float32 x (n, in)."""
        n = x.shape[0]
        q = np.empty(x.shape, np.uint8)
        x_scales = np.zeros(-(-n // TILE) * TILE, np.float32)  # lanes past the last row: never stored
        self._quantize(x, x.view(np.uint32), q, x_scales)
        return self._run(q.view(np.float32), self.row_sums, x_scales)  # a row's quads as 4-byte lanes


def bind(packed: Any, bias: np.ndarray, *, parallel: bool = True) -> Callable[[np.ndarray], np.ndarray]:
    """``run(x) -> x @ W.T + bias`` for an int8 1 x 4 ``bsr`` weight: VNNI above `SMALL_BATCH` rows.

    Up to `SMALL_BATCH` rows run `kernels.numba`'s CSR kernel on the same int8 weight (weight-only
    INT8: x stays fp32; the quads' zeros are dropped, a random mask's quads are mostly zeros).
    """
    many = QuantizedSparseMatmul(packed, bias)
    few = small.bind(formats.csr_of_row_blocks(packed), bias, parallel=parallel)

    def run(x: np.ndarray) -> np.ndarray:
        return few(x) if x.shape[0] <= SMALL_BATCH else many(x)

    return run
