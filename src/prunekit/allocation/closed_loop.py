"""Allocate for a latency target, measure the pruned model end to end, correct the table, repeat.

A `LatencyTable` adds up savings each timed alone; pruned together, coupled groups save less
than the sum and what the layers' own times leave out does not shrink with them, so its
prediction is biased. One measured point calibrates it (`LatencyTable.calibrated`). The
measured speed-up is not linear in the prediction, though (a group that dominates the latency
enters or leaves the allocation), so once one round has overshot and another undershot, the
next aims between them in the table's own, uncalibrated saving instead of rescaling again.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import statistics
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import nn

from prunekit.allocation.allocate import Allocation, LatencyTarget, allocate
from prunekit.allocation.latency import LatencyTable
from prunekit.allocation.sensitivity import SensitivityTable
from prunekit.errors import ConfigError
from prunekit.measure.bench import Latency, measure_latency

SpeedupMeter = Callable[[nn.Module], float]


@dataclass(frozen=True)
class MeasuredAllocation:
    """The round whose measured speed-up came closest to the target.

    Attributes:
        allocation: its levels (its `achieved` is the calibrated table's prediction).
        model: the pruned copy that was measured.
        measured_speedup: dense / pruned latency as measured.
        rounds: (predicted, measured) speed-up of every round, in order.
    """

    allocation: Allocation
    model: nn.Module
    measured_speedup: float
    rounds: tuple[tuple[float, float], ...]


def paired_ratio(dense: Latency, pruned: Latency) -> float:
    """Median over repeats of dense time / pruned time, from one interleaved `measure_latency` run.

    A pair of calls made one after the other sees the same load, so on a shared machine the
    median of the pairs' ratios moves less than the ratio of the two medians.
    """
    return statistics.median(d / p for d, p in zip(dense.times_ms, pruned.times_ms, strict=True))


def paired_speedup(dense: nn.Module, pruned: nn.Module, inputs: Any, *, repeats: int = 30) -> float:
    """Median over interleaved pairs of dense time / pruned time (`paired_ratio`)."""
    timed = measure_latency({"dense": dense, "pruned": pruned}, inputs, repeats=repeats, warmup=3)
    return paired_ratio(timed["dense"], timed["pruned"])


def reachable_speedup(table: SensitivityTable, latency: LatencyTable) -> float:
    """The largest speed-up `latency` predicts with every unit at its highest scanned level."""
    budget = latency.budget(table, LatencyTarget(speedup=1.01))
    saved = sum(max((s for i, s in enumerate(savings) if not math.isnan(table.values[unit][i])), default=0.0)
                for unit, savings in budget.savings.items())
    return latency.model_ms / max(latency.model_ms - saved, 1e-12)


def allocate_measured(
    model: nn.Module,
    table: SensitivityTable,
    target: LatencyTarget,
    latency: LatencyTable,
    example_inputs: Any,
    *,
    rounds: int = 3,
    tolerance: float = 0.05,
    max_level: float | None = None,
    measure: SpeedupMeter | None = None,
    data: Any = None,
) -> MeasuredAllocation:
    """Allocate for `target`, prune a copy, measure it, calibrate `latency` on that point and
    allocate again, until the measured speed-up is within `tolerance` of the target or `rounds`
    are spent; `model` is not changed.

    Args:
        model: the dense model the table and scan were made on.
        example_inputs: inputs to trace the model and to time it (the served batch).
        measure: pruned model -> measured speed-up over `model`; default: timed here, interleaved
            (`paired_speedup`). Pass one that times on the target device (a bundle runner).
        data: calibration batches for criteria that need them, as `Allocation.apply` takes.

    Raises:
        ConfigError: `rounds` < 1 or `tolerance` <= 0.
        AllocationError: the target cannot be met at the scanned levels (names the binding unit).
    """
    if rounds < 1 or tolerance <= 0:
        raise ConfigError(f"allocate_measured: rounds must be >= 1 and tolerance > 0, got {rounds}, {tolerance}")
    meter = measure or (lambda pruned: paired_speedup(model, pruned, example_inputs))
    goal_saving = 1 - 1 / target.speedup
    current, best, history = latency, None, []
    under: float | None = None  # uncalibrated saving aimed at, on each side of the goal
    over: float | None = None
    for _ in range(rounds):
        reach = 0.995 * reachable_speedup(table, current)
        goal = min(target.speedup, reach) if reach > 1.0 else target.speedup  # else allocate names the bind
        allocation = allocate(table, LatencyTarget(speedup=goal), latency=current, max_level=max_level)
        pruned = allocation.apply(copy.deepcopy(model), example_inputs, data).eval()
        measured = meter(pruned)
        history.append((allocation.achieved, measured))
        if best is None or abs(measured / target.speedup - 1) < abs(best.measured_speedup / target.speedup - 1):
            best = MeasuredAllocation(allocation, pruned, measured, ())
        if abs(measured / target.speedup - 1) <= tolerance or measured <= 1.0:
            break
        raw_saving = (1 - 1 / allocation.achieved) / current.saving_scale
        under, over = (raw_saving, over) if measured < target.speedup else (under, raw_saving)
        if under is not None and over is not None:
            current = dataclasses.replace(latency, saving_scale=goal_saving / ((under + over) / 2))
        else:
            current = current.calibrated(allocation.achieved, measured)
    assert best is not None  # rounds >= 1
    return dataclasses.replace(best, rounds=tuple(history))
