"""64-byte aligned float32 buffers for the vector kernels.

A 512-bit load from an address that is not a multiple of 64 spans two cache lines and costs two
loads. numpy's `np.empty` aligns to 16 bytes only, so a kernel reading 16 floats at a time from
such a buffer splits every load: the many-row kernel ran 1.26-1.59x faster (2 threads, 128 rows
of x, 3072 x 768 / 768 x 3072 / 384 x 384 / 384 x 1536 at 90 and 95 %, the kernel timed alone)
with its x tiles and y allocated here instead of 16 bytes past a boundary.
"""

from __future__ import annotations

import math
from functools import cache
from typing import Any

import numpy as np

from prunekit.runtime.kernels.numba_setup import import_numba

ALIGN = 64  # bytes: one cache line, one AVX-512 register


@cache
def aligned_allocator() -> Any:
    """The numba function ``aligned_f32(n)``: callable from other compiled kernels (their private buffers)."""
    numba = import_numba()

    @numba.njit(nogil=True, cache=True)
    def aligned_f32(n):  # pragma: no cover - compiled
        """n float32 from the first 64-byte boundary of a slightly larger buffer (numba: ~1 us a call)."""
        raw = np.empty(n + ALIGN // 4, np.float32)
        start = (-raw.ctypes.data % ALIGN) // 4
        return raw[start: start + n]

    return aligned_f32


def aligned_empty(shape: tuple[int, ...]) -> np.ndarray:
    """An uninitialised C-contiguous float32 array whose first element sits on a 64-byte boundary."""
    return aligned_allocator()(math.prod(shape)).reshape(shape)
