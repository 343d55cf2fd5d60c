"""prunekit's own sparse CPU kernels, one entry point for every packed format: `bind` and `sparse_linear`.

`numba` holds the kernels for ``csr``, ``bsr`` and ``nm24`` (numba-compiled loops), `spmm` the
many-row ``csr`` kernel (batch 16-128: rows of x as vector lanes), `spmm_vnni` its INT8 x INT8
twin for 1 x 4 ``bsr`` blocks (AVX-512 VNNI), `avx512` the
row-lane 2:4 INT8 kernel for ``nm24r`` (LLVM IR with AVX-512 permutes), and `numba_setup` what
both need first (numba itself, imported on a kernel's first use, and the threading layer).
`bind` dispatches on `PackedWeight.kind`, so callers need not know which module runs a format.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from prunekit.runtime.formats import PackedWeight
from prunekit.runtime.kernels import avx512, numba, spmm, spmm_vnni

__all__ = ["bind", "sparse_linear"]


def bind(
    packed: PackedWeight, bias: np.ndarray, *, parallel: bool = True, many_rows: bool = False, siblings: int = 1
) -> Callable[[np.ndarray], np.ndarray]:
    """`sparse_linear` for one weight, its kernel and arguments looked up once: ``run(x) -> y``.

    x is a C-contiguous float32 (n, in) array. This is the per-call path of the runtime's modules:
    decoding calls ~200 layers a token, and every lookup skipped here is a microsecond saved.
    With `many_rows` (``csr``, or int8 ``bsr`` 1 x 4 for VNNI), batches above `spmm.SMALL_BATCH` rows
    run `spmm`'s (or `spmm_vnni`'s) kernel; `siblings` > 1 (``csr`` many-row only) splits y by sibling layer.
    """
    if siblings > 1 and not (many_rows and packed.kind == "csr"):
        raise ValueError(f"only the many-row csr kernel splits its outputs by sibling, not {packed.kind!r}")
    if many_rows:  # int8 1 x 4 blocks: x quantized too (VNNI)
        if packed.kind == "bsr":
            return spmm_vnni.bind(packed, bias, parallel=parallel)
        return spmm.bind(packed, bias, parallel=parallel, siblings=siblings)
    if packed.kind == "nm24r":  # row-lane 2:4 INT8, AVX-512 only
        return avx512.bind_nm24r(packed, bias, parallel=parallel)
    return numba.bind(packed, bias, parallel=parallel)


def sparse_linear(
    packed: PackedWeight, x: np.ndarray, bias: np.ndarray, *, parallel: bool = True, many_rows: bool = False
) -> np.ndarray:
    """y = x @ W.T + bias for a `formats.PackedWeight` W and a float32 (n, in) array x; returns (n, out)."""
    run = bind(packed, bias, parallel=parallel, many_rows=many_rows)
    return run(np.ascontiguousarray(x, dtype=np.float32))
