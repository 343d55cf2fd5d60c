"""Measure what pruning bought: parameters, FLOPs and latency, dense and pruned side by side.

Latency follows nanoGPT's bench.py: warm up, synchronise, then time each call; models are
interleaved call by call in one process, so slow drift (thermal, other jobs on a shared
machine) hits all of them alike, and the ratios are more trustworthy than the absolute times.
"""

from __future__ import annotations

import contextlib
import statistics
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from prunekit.core.counting import count_flops, count_params
from prunekit.core.inputs import call_model
from prunekit.errors import ConfigError
from prunekit.measure.heap import minor_page_faults, retained_memory


@dataclass(frozen=True)
class Latency:
    """Per-call latency of one model: median and 99th percentile, in milliseconds."""

    latency_ms_p50: float
    latency_ms_p99: float
    repeats: int
    times_ms: tuple[float, ...] = field(default=(), repr=False, compare=False)  # per call, in call order
    page_faults_per_call: float = field(default=0.0, compare=False)  # minor faults during the timed calls

    def __str__(self) -> str:
        return f"p50 {self.latency_ms_p50:.3f} ms, p99 {self.latency_ms_p99:.3f} ms ({self.repeats} runs)"


def _sync(device: torch.device | None) -> None:
    if device is not None and device.type == "cuda":
        torch.cuda.synchronize(device)


def _device(model: nn.Module) -> torch.device | None:
    p = next(model.parameters(), None)
    return p.device if p is not None else None


@torch.no_grad()
def measure_latency(
    models: Mapping[str, nn.Module],
    inputs: Any,
    *,
    repeats: int = 50,
    warmup: int = 5,
    threads: int | None = None,
    retain_memory: bool = True,
) -> dict[str, Latency]:
    """Time each model's forward on `inputs`, interleaved call by call; does not mutate.

    Args:
        models: name -> model (e.g. {"dense": dense, "pruned": pruned}); all put in eval mode
            for the measurement and restored afterwards.
        inputs: a tensor, a tuple of args or a dict of kwargs, the same for all models.
        repeats: timed calls per model.
        warmup: untimed calls per model first (allocator, caches, lazy init).
        threads: `torch.set_num_threads` during the run (restored after); None keeps it.
        retain_memory: keep freed memory mapped while timing (`prunekit.measure.heap`), as
            jemalloc/tcmalloc would; False times glibc's default, which re-faults every large
            activation on every call (the faults per call are recorded either way).

    Returns:
        name -> `Latency`.

    Example:
        >>> res = measure_latency({"a": nn.Linear(8, 8)}, torch.randn(1, 8), repeats=5, warmup=1)
        >>> res["a"].latency_ms_p50 > 0
        True
    """
    if repeats < 1 or warmup < 0:
        raise ConfigError(f"measure_latency: repeats must be >= 1 and warmup >= 0, got {repeats}, {warmup}")
    if not models:
        raise ConfigError("measure_latency: no models given")
    old_threads = torch.get_num_threads()
    modes = {name: m.training for name, m in models.items()}
    times: dict[str, list[float]] = {name: [] for name in models}
    faults = dict.fromkeys(models, 0)
    allocator = retained_memory() if retain_memory else contextlib.nullcontext()
    try:
        if threads is not None:
            torch.set_num_threads(threads)
        for m in models.values():
            m.eval()
        with allocator:
            for _ in range(warmup):
                for m in models.values():
                    call_model(m, inputs)
            order = list(models.items())
            for i in range(repeats):
                # Alternate the order (A B, B A, ...): the model called second always finding the
                # caches and the allocator warm from the first would bias the ratio.
                for name, m in order if i % 2 == 0 else order[::-1]:
                    device = _device(m)
                    _sync(device)
                    before = minor_page_faults()
                    start = time.perf_counter()
                    call_model(m, inputs)
                    _sync(device)
                    times[name].append((time.perf_counter() - start) * 1000.0)
                    faults[name] += minor_page_faults() - before
    finally:
        torch.set_num_threads(old_threads)
        for name, m in models.items():
            m.train(modes[name])
    return {name: Latency(statistics.median(t), _percentile(t, 99.0), len(t), tuple(t), faults[name] / len(t))
            for name, t in times.items()}


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    k = (len(ordered) - 1) * q / 100.0
    lo, hi = int(k), min(int(k) + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


@dataclass(frozen=True)
class Comparison:
    """Dense vs pruned: params, FLOPs and latency, with ratios (pruned / dense) and a verdict."""

    params: tuple[int, int]
    flops: tuple[int, int]
    latency: tuple[Latency, Latency]
    threads: int

    @property
    def params_ratio(self) -> float:
        return self.params[1] / max(self.params[0], 1)

    @property
    def flops_ratio(self) -> float:
        return self.flops[1] / max(self.flops[0], 1)

    @property
    def latency_ratio(self) -> float:
        return self.latency[1].latency_ms_p50 / max(self.latency[0].latency_ms_p50, 1e-12)

    @property
    def speedup_vs_flops(self) -> float:
        """Measured speed-up as a fraction of the FLOPs speed-up (1.0: latency follows FLOPs)."""
        flops_speedup = 1.0 / max(self.flops_ratio, 1e-12)
        return (1.0 / max(self.latency_ratio, 1e-12)) / flops_speedup if flops_speedup > 0 else 0.0

    def summary(self) -> str:
        """A few lines comparing dense and pruned, saying in words if it is not faster."""
        d, p = self.latency
        lines = [
            f"params  {self.params[0]:>14,} -> {self.params[1]:>14,}  ({self.params_ratio:.1%})",
            f"FLOPs   {self.flops[0]:>14,} -> {self.flops[1]:>14,}  ({self.flops_ratio:.1%})",
            f"latency p50 {d.latency_ms_p50:.3f} -> {p.latency_ms_p50:.3f} ms ({self.latency_ratio:.1%}), "
            f"p99 {d.latency_ms_p99:.3f} -> {p.latency_ms_p99:.3f} ms, {self.threads} threads",
        ]
        if self.latency_ratio >= 0.98:
            lines.append("measured latency did NOT improve: the pruned model is not faster here.")
        else:
            lines.append(
                f"speed-up {1 / self.latency_ratio:.2f}x measured vs {1 / max(self.flops_ratio, 1e-12):.2f}x "
                f"from FLOPs ({self.speedup_vs_flops:.0%} of the FLOPs gain)"
            )
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.summary()


def compare_speed(
    dense: nn.Module, pruned: nn.Module, inputs: Any, *, repeats: int = 50, warmup: int = 5, threads: int | None = None
) -> Comparison:
    """Params, FLOPs and interleaved latency of `dense` vs `pruned` on `inputs`.

    Example:
        >>> c = compare_speed(nn.Linear(8, 8), nn.Linear(8, 4), torch.randn(1, 8), repeats=3, warmup=1)
        >>> c.params_ratio < 1
        True
    """
    latency = measure_latency(
        {"dense": dense, "pruned": pruned}, inputs, repeats=repeats, warmup=warmup, threads=threads
    )
    return Comparison(
        (count_params(dense), count_params(pruned)),
        (count_flops(dense, inputs), count_flops(pruned, inputs)),
        (latency["dense"], latency["pruned"]),
        threads if threads is not None else torch.get_num_threads(),
    )
