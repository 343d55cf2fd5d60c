"""What every numba kernel module needs before it compiles: numba itself, and one threading layer.

numba is an optional dependency (extra `speed`), imported here on a kernel's first use only, so
`import prunekit` never loads it. Every kernel module (`numba`, `avx512`, `spmm`) calls `import_numba` and
`prefer_openmp` from here, so they share one threading layer and one error message; `cpu_has`
gates the kernels that need instructions beyond plain x86-64.
"""

from __future__ import annotations

import os
from typing import Any

from prunekit.errors import PrunekitError


def import_numba() -> Any:
    """The numba module; a `PrunekitError` naming `pip install 'prunekit[speed]'` where it is missing."""
    try:
        import numba
    except ImportError:  # pragma: no cover - depends on the environment
        raise PrunekitError(
            "prunekit's sparse CPU kernels need numba, which is not installed; "
            "install it with: pip install 'prunekit[speed]'"
        ) from None
    return numba


def cpu_has(*features: str) -> bool:
    """Whether this CPU has every one of LLVM's named `features` ("avx512f", "avx512vnni", ...); False without llvmlite.

    What gates a kernel whose instructions not every x86 CPU has: `accelerate` skips it by name
    and a direct call raises, instead of an illegal instruction.
    """
    try:
        from llvmlite import binding
    except ImportError:  # pragma: no cover - numba (and llvmlite) missing
        return False
    host = binding.get_host_cpu_features()
    return all(host.get(f, False) for f in features)


SPIN_COUNT = "10000"  # GOMP_SPINCOUNT for numba's OpenMP workers: ~10-50 us of spinning, then sleep


def prefer_openmp(numba: Any) -> None:
    """Pick numba's threading layer (OpenMP, else workqueue) unless the user chose one, and start its threads.

    Measured here (2-core EPYC, `benchmarks/cpu_sparse_layers.py` and `llm_decode_speed.py`):
    waking workqueue's sleeping workers costs ~65 us a launch against ~2 us for OpenMP's spinning
    ones, which made SmolLM2's 2:4 decoding 1.19x dense INT8 on workqueue against 1.24-1.30x on
    OpenMP, and a chain of many-row kernels with GELU / LayerNorm / dense `F.linear` between them
    1.25-1.8x faster. OpenMP's idle workers spin, though, and so do torch's (another libgomp):
    the spin is bounded with ``GOMP_SPINCOUNT`` (`SPIN_COUNT`), set only while numba loads its
    libgomp (torch's, loaded with torch, has already read its environment), so kernels launched
    back to back find the workers awake and torch's ops later find the cores free.
    `NUMBA_THREADING_LAYER` or ``GOMP_SPINCOUNT`` set by the user win. GNU OpenMP is not fork-safe:
    a forked child must not run the parallel kernels (start workers with "spawn", as torchrun does).
    """
    if "NUMBA_THREADING_LAYER" not in os.environ:
        numba.config.THREADING_LAYER = "default"
        numba.config.THREADING_LAYER_PRIORITY = ["omp", "workqueue", "tbb"]
    ours = "GOMP_SPINCOUNT" not in os.environ
    if ours:
        os.environ["GOMP_SPINCOUNT"] = SPIN_COUNT
    try:
        numba.get_num_threads()  # launches the threads (and loads libgomp, which reads the variable)
    finally:
        if ours:
            del os.environ["GOMP_SPINCOUNT"]
