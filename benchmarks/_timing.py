"""Shared by the benchmark scripts: interleaved timing of arbitrary callables (e.g. onnxruntime sessions)."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable


def timed(fns: dict[str, Callable[[], object]], repeats: int, warmup: int = 3) -> dict[str, float]:
    """Median milliseconds per call of each function, called in turn (interleaved) after warm-up."""
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(warmup):
        for f in fns.values():
            f()
    for _ in range(repeats):
        for k, f in fns.items():
            t = time.perf_counter()
            f()
            times[k].append((time.perf_counter() - t) * 1e3)
    return {k: round(statistics.median(v), 2) for k, v in times.items()}


IDLE_BEFORE_BLOCK_S = 0.05  # torch's OpenMP workers spin ~8 ms after a call: let them sleep before a block


def timed_blocks(fns: dict[str, Callable[[], object]], repeats: int, block: int,
                 idle_s: float = IDLE_BEFORE_BLOCK_S) -> dict[str, float]:
    """Median ms per call of each function: `block` calls in a row, the functions alternating block by block.

    One untimed call each first (compile, fault in, fill caches); round r starts at function r (a
    rotation, so none always follows the same one); `idle_s` of sleep before each block, so whatever
    ran before has gone quiet (spinning worker threads) and does not slow the next engine.
    """
    names = list(fns)
    times: dict[str, list[float]] = {n: [] for n in names}
    for n in names:
        fns[n]()
    for rep in range(repeats):
        shift = rep % len(names)
        for n in names[shift:] + names[:shift]:
            time.sleep(idle_s)
            start = time.perf_counter()
            for _ in range(block):
                fns[n]()
            times[n].append((time.perf_counter() - start) * 1e3 / block)
    return {n: statistics.median(v) for n, v in times.items()}
