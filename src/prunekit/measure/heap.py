"""Keep freed memory in the process while timing, so a forward costs what the model costs.

glibc's malloc hands blocks above its mmap threshold (128 KiB, rising to at most 32 MiB) back to
the kernel when they are freed, so a forward that frees and reallocates its activations
page-faults on every page of them again. Measured here on EfficientNet-Lite0 at batch 32: 634,000
minor page faults per forward, 2.4x the forward's time, and the same model's median moved by up
to 59 % between two processes. Serving stacks avoid this with jemalloc or tcmalloc (PyTorch's
CPU tuning guide recommends them); `retained_memory()` gets the same steady state from glibc
itself with `mallopt`, for the duration of a measurement.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import platform
from collections.abc import Iterator
from typing import Any

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD, M_MMAP_MAX = -1, -3, -4  # mallopt parameters (malloc.h)
KEEP_UP_TO = 1 << 30  # freed memory kept before glibc trims the heap: 1 GiB
# Afterwards. Any mallopt of these switches glibc's dynamic thresholds off for good, so the block
# leaves them where that policy settles once it has seen large tensors (mmap threshold at its
# 32 MiB ceiling, trim threshold twice that) rather than at the 128 KiB start values.
AFTER_MMAP_THRESHOLD, AFTER_TRIM_THRESHOLD, AFTER_MMAP_MAX = 32 << 20, 64 << 20, 65536

RETAINED = "glibc malloc keeping freed memory (mallopt M_MMAP_MAX=0, M_TRIM_THRESHOLD=1 GiB)"
UNCHANGED = "the system allocator, unchanged (not glibc)"
SYSTEM_ALLOCATOR = "the system allocator's defaults (asked for)"

_depth = 0


@functools.cache
def _glibc() -> Any | None:
    """glibc through ctypes, looked up once per process (None elsewhere)."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:  # pragma: no cover - glibc without the usual soname
        return None


@contextlib.contextmanager
def retained_memory() -> Iterator[str]:
    """Within the block, freed heap memory stays mapped; yields a description for reports.

    Nested uses are fine (the outermost one restores). On leaving, glibc may map large blocks
    again and the kept memory is trimmed; its thresholds stay fixed at `AFTER_*` (see there).
    Elsewhere than glibc the allocator is left alone and the description says so.
    """
    global _depth
    libc = _glibc()
    if libc is None:
        yield UNCHANGED
        return
    if _depth == 0:
        libc.mallopt(M_MMAP_MAX, 0)
        libc.mallopt(M_TRIM_THRESHOLD, KEEP_UP_TO)
    _depth += 1
    try:
        yield RETAINED
    finally:
        _depth -= 1
        if _depth == 0:
            libc.mallopt(M_MMAP_MAX, AFTER_MMAP_MAX)
            libc.mallopt(M_MMAP_THRESHOLD, AFTER_MMAP_THRESHOLD)
            libc.mallopt(M_TRIM_THRESHOLD, AFTER_TRIM_THRESHOLD)
            libc.malloc_trim(0)


def minor_page_faults() -> int:
    """Minor page faults of this process so far (to count them per call); 0 where not counted."""
    try:
        import resource
    except ImportError:  # pragma: no cover - not a Unix
        return 0
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
