"""Several models, one latency budget: `allocate_pipeline(stages, budget_ms=...)`.

A perception or retrieval pipeline runs several models per request. Each has its own
sensitivity table and latency table; the budget is on the end-to-end latency, the sum of the
stages' latencies when they run one after another, or the critical path (the slowest branch of
each parallel group) when some run side by side. Each model's degradation is multiplied by its
importance weight, which also converts the models' different metrics into one scale.

The allocation is the same Lagrangian / greedy walk as `prunekit.allocate` (Shoham & Gersho
1988), run twice (`prunekit.allocation.solver`). Each model's frontier (least damage at each
saving, over its own units) is convex and piecewise linear. A group of parallel models capped at
latency T costs the sum of its members' frontiers at T, again convex, with vertices where any
member's frontier has one; so each group becomes one unit whose levels are caps T, and the walk
over groups splits the budget. For sequential stages this is exactly the walk over the union of
all models' units. Each model is then allocated under its cap. A per-model size budget
(`max_size_bytes`) is met first, as `allocate` with a `SizeTarget` meets it alone; the latency
walk only prunes further from there (feasible, not jointly optimal in both resources).

`even_split` is the baseline: the same end-to-end budget met by giving every model the same
speed-up factor (the pipeline's), each allocated on its own. `measure.pipelines.measure_pipeline`
times the pruned pipelines end to end.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal

from pydantic import Field
from torch import nn

from prunekit.allocation.allocate import Allocation, LatencyTarget, SizeTarget, Target, allocate
from prunekit.allocation.latency import LatencyTable
from prunekit.allocation.sensitivity.table import SensitivityTable
from prunekit.allocation.solver import Point, fractional, frontier, usable_points, walk
from prunekit.errors import AllocationError, ConfigError

Topology = Literal["sequential", "parallel"] | Sequence[Sequence[str]]


class StageTarget(Target):
    """One model's share of a pipeline budget: at most `latency_ms` as its latency table predicts."""

    latency_ms: float = Field(gt=0.0)
    max_size_bytes: int | None = Field(default=None, gt=0)


@dataclass(frozen=True)
class PipelineStage:
    """One model of a pipeline: its tables, importance and optional size budget.

    Attributes:
        name: unique within the pipeline.
        table: its `SensitivityTable` (any metric; `weight` puts the models on one scale).
        latency: its `LatencyTable`, measured at the scan's levels on the serving inputs.
        weight: importance of its degradation (> 0).
        max_size_bytes: its checkpoint must fit (predicted as `SizeTarget` does).
        max_level: never choose a level above this for its units.
    """

    name: str
    table: SensitivityTable
    latency: LatencyTable
    weight: float = 1.0
    max_size_bytes: int | None = None
    max_level: float | None = None


@dataclass
class _Model:
    """A stage's curves in ms saved from its dense latency, ready to walk."""

    stage: PipelineStage
    points: dict[str, list[Point]]
    front: list[tuple[float, float]]
    dense_ms: float

    @property
    def min_ms(self) -> float:
        return self.dense_ms - self.front[-1][0]

    def damage_at(self, cap_ms: float) -> float:
        """Least unweighted damage with latency <= cap_ms (interpolated on the frontier)."""
        need = self.dense_ms - cap_ms
        if need <= self.front[0][0]:
            return self.front[0][1]
        for (x0, y0), (x1, y1) in zip(self.front, self.front[1:], strict=False):
            if need <= x1 + 1e-12:
                return y0 + (y1 - y0) * (need - x0) / (x1 - x0)
        return math.inf

    def allocation(self, cap_ms: float) -> Allocation:
        """This model's levels under `cap_ms` (a new `Allocation`)."""
        required = min(self.dense_ms - cap_ms, self.front[-1][0])
        levels, saved, damage = walk(self.points, required, exact=True)
        target = StageTarget(latency_ms=cap_ms, max_size_bytes=self.stage.max_size_bytes)
        table = self.stage.table
        return Allocation(levels, target, self.dense_ms / max(self.dense_ms - saved, 1e-12), damage, table.family,
                          table.kind)


@dataclass(frozen=True)
class PipelineAllocation:
    """One allocation per model, with the pipeline's predicted (and optionally measured) latency.

    Attributes:
        allocations: stage name -> `Allocation` (`to_config()` rules or `apply(model, inputs)`).
        groups: the topology: groups run one after another, the stages of a group in parallel.
        dense_ms: stage -> dense latency from its latency table.
        predicted_ms: stage -> predicted latency at its levels.
        weights: stage -> importance weight.
        budget_ms: the end-to-end budget.
        method: "joint" or "even split".
        measured: from `measure_pipeline` via `with_measurement`, else None.
    """

    allocations: dict[str, Allocation]
    groups: list[list[str]]
    dense_ms: dict[str, float]
    predicted_ms: dict[str, float]
    weights: dict[str, float]
    budget_ms: float
    method: str
    measured: dict[str, Any] | None = field(default=None)

    def end_to_end_ms(self, per_stage: Mapping[str, float]) -> float:
        """Critical path: sum over groups of the slowest stage of each."""
        return sum(max(per_stage[s] for s in group) for group in self.groups)

    @property
    def weighted_degradation(self) -> float:
        """Sum over stages of weight x predicted degradation."""
        return sum(self.weights[s] * a.predicted_degradation for s, a in self.allocations.items())

    def shares(self) -> dict[str, tuple[float, float]]:
        """Stage -> (share of the dense end-to-end latency, share of the pruned one), predicted."""
        dense, pruned = self.end_to_end_ms(self.dense_ms), self.end_to_end_ms(self.predicted_ms)
        return {s: (self.dense_ms[s] / dense, self.predicted_ms[s] / pruned) for s in self.allocations}

    def apply(self, models: Mapping[str, nn.Module], example_inputs: Mapping[str, Any]) -> dict[str, nn.Module]:
        """Prune each named model as allocated, in place (mutates and returns them, by name).

        Raises:
            ConfigError: a stage has no model; nothing is pruned then.
        """
        missing = [s for s in self.allocations if s not in models]
        if missing:
            raise ConfigError(f"apply: no model for stage(s) {missing}: pass every stage's model by name")
        return {s: a.apply(models[s], example_inputs.get(s)) for s, a in self.allocations.items()}

    def with_measurement(self, measured: Mapping[str, Any], name: str) -> PipelineAllocation:
        """A copy carrying pipeline `name`'s figures from `measure_pipeline` (shown by `report`, `to_dict`)."""
        if name not in measured["pipelines"]:
            raise ConfigError(f"with_measurement: no pipeline {name!r} among {list(measured['pipelines'])}")
        ref, mine = measured["pipelines"][measured["reference"]], measured["pipelines"][name]
        return replace(self, measured={"dense_ms": ref["median_ms"], "pruned_ms": mine["median_ms"],
                                       "speedup": mine["speedup"], "repeats": measured["repeats"]})

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able data: per stage levels and shares, and the end-to-end figures."""
        shares = self.shares()
        stages = {s: {"weight": self.weights[s], "dense_ms": self.dense_ms[s], "predicted_ms": self.predicted_ms[s],
                      "share_before": shares[s][0], "share_after": shares[s][1],
                      "predicted_degradation": a.predicted_degradation, "levels": a.levels, "kind": a.kind}
                  for s, a in self.allocations.items()}
        return {"method": self.method, "groups": self.groups, "budget_ms": self.budget_ms,
                "dense_end_to_end_ms": self.end_to_end_ms(self.dense_ms),
                "predicted_end_to_end_ms": self.end_to_end_ms(self.predicted_ms),
                "weighted_degradation": self.weighted_degradation, "stages": stages, "measured": self.measured}

    def report(self) -> str:
        """A table per stage (latency and share before -> after, damage), then end to end."""
        shares = self.shares()
        width = max([len(s) for s in self.allocations] + [5])
        rows = [f"pipeline ({self.method}), budget {self.budget_ms:.3f} ms, groups {self.groups}",
                f"{'stage':<{width}}  weight  dense ms  share -> pruned ms  share  speed-up  degradation"]
        for s, a in self.allocations.items():
            rows.append(f"{s:<{width}}  {self.weights[s]:6.3g}  {self.dense_ms[s]:8.3f}  {shares[s][0]:5.1%} -> "
                        f"{self.predicted_ms[s]:9.3f}  {shares[s][1]:5.1%}  {a.achieved:7.3f}x  "
                        f"{a.predicted_degradation:11.4g}")
        rows.append(f"end to end (predicted): {self.end_to_end_ms(self.dense_ms):.3f} -> "
                    f"{self.end_to_end_ms(self.predicted_ms):.3f} ms; weighted degradation "
                    f"{self.weighted_degradation:.4g}")
        if self.measured:
            m = self.measured
            rows.append(f"end to end (measured, median of {m['repeats']} interleaved runs): {m['dense_ms']:.3f} -> "
                        f"{m['pruned_ms']:.3f} ms ({m['speedup']:.3f}x)")
        if any(len(g) > 1 for g in self.groups):
            rows.append("parallel stages: shares are each stage's latency over the critical path (they overlap)")
        return "\n".join(rows)

    def __str__(self) -> str:
        return self.report()


# --------------------------------------------------------------------------------------------
# Validation and preparation.


def _groups(names: list[str], topology: Topology) -> list[list[str]]:
    if topology == "sequential":
        return [[n] for n in names]
    if topology == "parallel":
        return [list(names)]
    if isinstance(topology, str):
        raise ConfigError(f"topology={topology!r}: use 'sequential', 'parallel' or a list of groups of stage names")
    groups = [list(g) for g in topology]
    placed = [n for g in groups for n in g]
    unknown = sorted(set(placed) - set(names))
    twice = sorted({n for n in placed if placed.count(n) > 1})
    absent = [n for n in names if n not in placed]
    if unknown or twice or absent or not all(groups):
        raise ConfigError(f"topology {groups}: every stage must appear in exactly one non-empty group "
                          f"(unknown {unknown}, repeated {twice}, missing {absent}; stages {names})")
    return groups


def _validate(stages: Sequence[PipelineStage]) -> None:
    if not stages:
        raise ConfigError("allocate_pipeline: no stages given")
    names = [s.name for s in stages]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise ConfigError(f"duplicate stage name(s) {twice}: give every model of the pipeline its own name")
    for s in stages:
        if not (math.isfinite(s.weight) and s.weight > 0):
            raise ConfigError(f"stage {s.name!r}: weight={s.weight!r} must be a finite number > 0")
        if s.max_size_bytes is not None and s.max_size_bytes <= 0:
            raise ConfigError(f"stage {s.name!r}: max_size_bytes={s.max_size_bytes!r} must be > 0 (or None)")


def _prepare(stage: PipelineStage) -> _Model:
    """The stage's latency curves, starting where its size budget puts it."""
    try:
        savings = stage.latency.budget(stage.table, LatencyTarget(speedup=2.0)).savings
    except ConfigError as err:
        raise ConfigError(f"stage {stage.name!r}: {err}") from None
    start = None
    if stage.max_size_bytes is not None:
        try:
            start = allocate(stage.table, SizeTarget(size_bytes=stage.max_size_bytes), max_level=stage.max_level,
                             exact=False).levels
        except AllocationError as err:
            raise AllocationError(f"stage {stage.name!r}: max_size_bytes={stage.max_size_bytes} cannot be met "
                                  f"({err})") from None
    points = usable_points(stage.table, savings, max_level=stage.max_level, start=start)
    return _Model(stage, points, frontier(points), stage.latency.model_ms)


def _budget_ms(dense_ms: float, budget_ms: float | None, speedup: float | None) -> float:
    if (budget_ms is None) == (speedup is None):
        raise ConfigError("give exactly one of budget_ms= (end-to-end milliseconds) and speedup= (dense / pruned)")
    if budget_ms is not None:
        if not (math.isfinite(budget_ms) and budget_ms > 0):
            raise ConfigError(f"budget_ms={budget_ms!r} must be a finite number of milliseconds > 0")
        return float(budget_ms)
    if speedup is None or not (math.isfinite(speedup) and speedup >= 1.0):
        raise ConfigError(f"speedup={speedup!r} must be a finite number >= 1")
    return dense_ms / speedup


def _unreachable(models: dict[str, _Model], groups: list[list[str]], budget: float, how: str,
                 binding: str | None = None) -> AllocationError:
    """The error for a budget beyond reach: the binding model and the fastest pipeline reachable.

    The binding model is the given one, else the slowest at its highest usable levels among
    each group's slowest (those on the critical path of the fastest reachable pipeline).
    """
    dense = sum(max(models[s].dense_ms for s in g) for g in groups)
    best = sum(max(models[s].min_ms for s in g) for g in groups)
    critical = [max(g, key=lambda s: models[s].min_ms) for g in groups]
    binding = binding or max(critical, key=lambda s: models[s].min_ms)
    m = models[binding]
    extra = f", size budget {m.stage.max_size_bytes} B" if m.stage.max_size_bytes is not None else ""
    others = ", ".join(f"{s!r} {models[s].min_ms:.4g} ms" for s in critical if s != binding)
    return AllocationError(
        f"pipeline budget {budget:.4g} ms cannot be met ({how}): the fastest the tables reach is {best:.4g} ms "
        f"end to end (dense {dense:.4g} ms). Binding model {binding!r} reaches only {m.min_ms:.4g} ms "
        f"(dense {m.dense_ms:.4g} ms, {m.dense_ms / m.min_ms:.3g}x) at its highest usable levels "
        f"(max_level {m.stage.max_level}{extra})" + (f"; the others at theirs: {others}" if others else "")
        + "; scan higher levels, relax its limits or raise the budget")


def _result(models: dict[str, _Model], groups: list[list[str]], caps: dict[str, float], budget: float,
            method: str) -> PipelineAllocation:
    allocations = {s: m.allocation(caps[s]) for s, m in models.items()}
    predicted = {s: models[s].dense_ms / a.achieved for s, a in allocations.items()}
    return PipelineAllocation(allocations, groups, {s: m.dense_ms for s, m in models.items()}, predicted,
                              {s: m.stage.weight for s, m in models.items()}, budget, method)


# --------------------------------------------------------------------------------------------
# The allocations.


def _group_points(members: list[_Model]) -> list[Point]:
    """A parallel group as one unit: (ms saved from its dense critical path, weighted damage, cap)."""
    dense = max(m.dense_ms for m in members)
    floor = max(m.min_ms for m in members)
    caps = {dense, floor} | {m.dense_ms - x for m in members for x, _ in m.front}
    points: list[Point] = []
    for cap in sorted((c for c in caps if floor - 1e-9 <= c <= dense + 1e-9), reverse=True):
        cap = max(cap, floor)
        if points and dense - cap <= points[-1][0] + 1e-12:
            continue
        points.append((dense - cap, sum(m.stage.weight * m.damage_at(cap) for m in members), cap))
    return points


def allocate_pipeline(
    stages: Sequence[PipelineStage],
    *,
    budget_ms: float | None = None,
    speedup: float | None = None,
    topology: Topology = "sequential",
) -> PipelineAllocation:
    """Allocate every stage's levels against one end-to-end latency budget; does not mutate.

    Args:
        stages: the models, each with its sensitivity and latency tables, weight and limits.
        budget_ms: end-to-end budget in ms, as the latency tables predict it.
        speedup: or the pipeline's speed-up over its dense end-to-end latency.
        topology: "sequential" (latencies add up), "parallel" (all run side by side: the
            slowest counts), or groups of stage names run one after another, the stages of a
            group in parallel: e.g. [["detect"], ["segment", "depth"]].

    Returns:
        A `PipelineAllocation`: one `Allocation` per stage and the report.

    Raises:
        ConfigError: duplicate names, weights <= 0, a bad topology or budget, tables that do
            not match.
        AllocationError: the budget is out of reach; names the binding model and the fastest
            end-to-end latency reachable.
    """
    _validate(stages)
    groups = _groups([s.name for s in stages], topology)
    models = {s.name: _prepare(s) for s in stages}
    dense = sum(max(models[s].dense_ms for s in g) for g in groups)
    budget = _budget_ms(dense, budget_ms, speedup)
    units = {str(i): _group_points([models[s] for s in g]) for i, g in enumerate(groups)}
    if sum(p[-1][0] for p in units.values()) < dense - budget - 1e-9:
        raise _unreachable(models, groups, budget, "joint allocation")
    caps, _, _ = fractional(units, dense - budget)
    per_stage = {s: caps[str(i)] for i, g in enumerate(groups) for s in g}
    return _result(models, groups, per_stage, budget, "joint")


def even_split(
    stages: Sequence[PipelineStage],
    *,
    budget_ms: float | None = None,
    speedup: float | None = None,
    topology: Topology = "sequential",
) -> PipelineAllocation:
    """The baseline: every stage gets the same speed-up factor, each allocated on its own.

    The factor is the pipeline's (dense end-to-end / budget), so the end-to-end latency meets
    the budget in any topology; within each model the levels are `prunekit.allocate`'s.
    Arguments and errors as `allocate_pipeline`.
    """
    _validate(stages)
    groups = _groups([s.name for s in stages], topology)
    models = {s.name: _prepare(s) for s in stages}
    dense = sum(max(models[s].dense_ms for s in g) for g in groups)
    budget = _budget_ms(dense, budget_ms, speedup)
    factor = dense / budget
    caps = {s: m.dense_ms / factor for s, m in models.items()}
    short = [s for s, m in models.items() if caps[s] < m.min_ms - 1e-9]
    if short:
        binding = max(short, key=lambda s: models[s].min_ms / models[s].dense_ms)
        raise _unreachable(models, groups, budget, f"even split: every model {factor:.3g}x faster", binding)
    return _result(models, groups, caps, budget, "even split")
