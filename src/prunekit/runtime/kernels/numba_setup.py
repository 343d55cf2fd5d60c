"""What every numba kernel module needs before it compiles: numba itself, and one threading layer.

numba is an optional dependency (extra `speed`), imported here on a kernel's first use only, so
`import prunekit` never loads it. Both kernel modules (`numba`, `avx512`) call `import_numba` and
`prefer_workqueue` from here, so the two share one threading layer and one error message.
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


def prefer_workqueue(numba: Any) -> None:
    """Use numba's workqueue thread pool unless the user chose a threading layer (mutates numba's config).

    numba's default here is OpenMP, whose idle workers spin; so do torch's own OpenMP workers
    (a separate libgomp). Alternating torch ops and numba kernels then leaves four spinning
    threads fighting over two cores: we measured a 0.7 ms kernel taking 24 ms and torch's dense
    `F.linear` 30x slower. workqueue's workers sleep on a semaphore instead, but waking them
    costs ~80 us a launch here against ~2 us for OpenMP's spinning ones: where the torch ops
    between kernels are small (batch-1 LLM decoding), `NUMBA_THREADING_LAYER=omp` made SmolLM2's
    2:4 kernels worth running on both cores (RESULTS.md); `accelerate` measures either way.
    """
    if "NUMBA_THREADING_LAYER" not in os.environ:
        numba.config.THREADING_LAYER = "workqueue"
