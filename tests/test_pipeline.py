"""Pipelines: several models against one end-to-end latency budget (`allocate_pipeline`)."""

from __future__ import annotations

import copy
import itertools
import json

import pytest
import torch

import prunekit as pk
from prunekit.allocation.allocate import AllocationError, LatencyTarget, allocate
from prunekit.allocation.latency import LatencyTable
from prunekit.allocation.pipeline import (
    PipelineStage,
    allocate_pipeline,
    even_split,
)
from prunekit.allocation.sensitivity import SensitivityTable, sensitivity
from prunekit.config import config_to_dict
from prunekit.measure.pipelines import measure_pipeline
from tests.models import ResidualCNN, mlp

LEVELS = [0.25, 0.5, 0.75]


def _stage(name: str, damage: dict[str, list[float]], dense: dict[str, float], pruned: dict[str, list[float]],
           *, weight: float = 1.0, max_size_bytes: int | None = None, params: int = 1000) -> PipelineStage:
    """A stage with hand-made tables: `damage` per unit and level, latencies in ms."""
    units = list(damage)
    table = SensitivityTable(
        units=units, levels=list(LEVELS), values={u: [1.0 - d for d in ds] for u, ds in damage.items()},
        baseline=1.0, higher_is_better=True, family=config_to_dict(pk.UnstructuredConfig(sparsity=0.5)),
        params=dict.fromkeys(units, params), total_params=params * len(units))
    lut = LatencyTable(units, list(LEVELS), dense, pruned, sum(dense.values()), "layer", 1)
    return PipelineStage(name, table, lut, weight=weight, max_size_bytes=max_size_bytes)


# "robust" saves a lot for little damage, "fragile" the reverse: an even split wastes budget on it
ROBUST = _stage("robust", {"a": [0.0, 0.01, 0.02], "b": [0.01, 0.02, 0.05]}, {"a": 6.0, "b": 4.0},
                {"a": [4.5, 3.0, 1.5], "b": [3.0, 2.0, 1.0]})
FRAGILE = _stage("fragile", {"c": [0.1, 0.3, 0.6], "d": [0.05, 0.2, 0.5]}, {"c": 5.0, "d": 5.0},
                 {"c": [4.0, 3.0, 2.0], "d": [4.0, 3.0, 2.0]}, weight=2.0)


def _discrete_optimum(stages: list[PipelineStage], budget_ms: float) -> float:
    """Least weighted damage over every combination of scanned levels that meets the budget."""
    options = []
    for s in stages:
        for u in s.table.units:
            opts = [(0.0, 0.0)] + [(s.latency.dense_ms[u] - s.latency.latency_ms[u][i],
                                    s.weight * s.table.degradation(u, i)) for i in range(len(LEVELS))]
            options.append(opts)
    dense = sum(s.latency.model_ms for s in stages)
    best = float("inf")
    for combo in itertools.product(*options):
        if dense - sum(x for x, _ in combo) <= budget_ms + 1e-9:
            best = min(best, sum(d for _, d in combo))
    return best


@pytest.mark.parametrize("speedup", [1.2, 1.5, 2.0])
def test_joint_beats_even_split_and_reaches_the_discrete_optimum(speedup: float) -> None:
    stages = [ROBUST, FRAGILE]
    joint = allocate_pipeline(stages, speedup=speedup)
    even = even_split(stages, speedup=speedup)
    budget = 20.0 / speedup
    for result in (joint, even):
        assert result.budget_ms == pytest.approx(budget)
        assert result.end_to_end_ms(result.predicted_ms) <= budget + 1e-6
    assert joint.weighted_degradation < even.weighted_degradation
    # the relaxation is never worse than the best combination of scanned levels
    assert joint.weighted_degradation <= _discrete_optimum(stages, budget) + 1e-9
    shares = joint.shares()
    assert shares["robust"][0] == pytest.approx(0.5) and shares["robust"][1] < 0.5  # robust gave more time
    even_shares = even.shares()  # the same factor everywhere keeps the shares
    assert all(before == pytest.approx(after) for before, after in even_shares.values())


def test_one_stage_is_the_single_model_allocation() -> None:
    alone = allocate(ROBUST.table, LatencyTarget(speedup=1.6), latency=ROBUST.latency)
    piped = allocate_pipeline([ROBUST], speedup=1.6).allocations["robust"]
    assert piped.levels == pytest.approx(alone.levels)
    assert piped.predicted_degradation == pytest.approx(alone.predicted_degradation)
    assert piped.achieved == pytest.approx(1.6)


def test_weights_move_the_damage() -> None:
    light = allocate_pipeline([ROBUST, PipelineStage(**{**FRAGILE.__dict__, "weight": 0.05})], speedup=1.5)
    heavy = allocate_pipeline([ROBUST, PipelineStage(**{**FRAGILE.__dict__, "weight": 50.0})], speedup=1.5)
    assert heavy.predicted_ms["fragile"] > light.predicted_ms["fragile"]
    assert heavy.allocations["fragile"].predicted_degradation < light.allocations["fragile"].predicted_degradation


def test_critical_path_prunes_only_the_slow_branch() -> None:
    fast = _stage("fast", {"e": [0.0, 0.0, 0.0]}, {"e": 4.0}, {"e": [3.0, 2.0, 1.0]})
    slow = _stage("slow", {"f": [0.1, 0.2, 0.4]}, {"f": 10.0}, {"f": [8.0, 6.0, 4.0]})
    parallel = allocate_pipeline([fast, slow], budget_ms=8.0, topology="parallel")
    assert parallel.groups == [["fast", "slow"]]
    assert parallel.allocations["fast"].levels == {"e": 0.0}  # free to prune, but off the critical path
    assert parallel.predicted_ms["slow"] == pytest.approx(8.0)
    assert parallel.end_to_end_ms(parallel.predicted_ms) == pytest.approx(8.0)
    # the same budget on a head stage then both in parallel: head + max(fast, slow)
    head = _stage("head", {"g": [0.0, 0.3, 0.9]}, {"g": 4.0}, {"g": [3.0, 2.0, 1.0]})
    grouped = allocate_pipeline([head, fast, slow], budget_ms=10.0, topology=[["head"], ["fast", "slow"]])
    assert grouped.end_to_end_ms(grouped.predicted_ms) == pytest.approx(10.0)
    sequential = allocate_pipeline([head, fast, slow], budget_ms=10.0)
    assert grouped.weighted_degradation < sequential.weighted_degradation  # overlap costs less pruning
    assert "critical path" in grouped.report()


def test_impossible_budget_names_the_binding_model_and_the_best_reachable() -> None:
    with pytest.raises(AllocationError, match=r"budget 6 ms cannot be met.*fastest the tables reach is 6.5 ms "
                                              r"end to end \(dense 20 ms\)\. Binding model 'fragile' reaches only "
                                              r"4 ms \(dense 10 ms.*the others at theirs: 'robust' 2.5 ms"):
        allocate_pipeline([ROBUST, FRAGILE], budget_ms=6.0)
    # even split: robust could go 4x, fragile only 2.5x
    with pytest.raises(AllocationError, match=r"even split: every model 2.86x.*Binding model 'fragile'"):
        even_split([ROBUST, FRAGILE], speedup=20 / 7)
    assert allocate_pipeline([ROBUST, FRAGILE], speedup=20 / 7).predicted_ms["fragile"] >= 4.0  # jointly reachable


def test_size_budget_of_one_model_is_respected() -> None:
    free = allocate_pipeline([ROBUST, FRAGILE], speedup=1.2)
    dense_bytes = 4 * 2000 + 1024
    cap = dense_bytes - 3000  # forces pruning in "fragile" that latency alone would not buy
    sized = _stage("fragile", {"c": [0.1, 0.3, 0.6], "d": [0.05, 0.2, 0.5]}, {"c": 5.0, "d": 5.0},
                   {"c": [4.0, 3.0, 2.0], "d": [4.0, 3.0, 2.0]}, weight=2.0, max_size_bytes=cap)
    result = allocate_pipeline([ROBUST, sized], speedup=1.2)
    levels = result.allocations["fragile"].levels
    stored = sum(1000 / 8 + 4.0 * 1000 * (1 - lv) if lv > 0 else 4000 for lv in levels.values()) + 1024
    assert stored <= cap
    assert sum(levels.values()) > sum(free.allocations["fragile"].levels.values())
    assert result.end_to_end_ms(result.predicted_ms) <= 20 / 1.2 + 1e-6
    with pytest.raises(AllocationError, match=r"stage 'fragile': max_size_bytes=100 cannot be met"):
        allocate_pipeline([ROBUST, PipelineStage(**{**sized.__dict__, "max_size_bytes": 100})], speedup=1.2)


def test_bad_input_is_named() -> None:
    with pytest.raises(pk.ConfigError, match=r"duplicate stage name\(s\) \['robust'\]"):
        allocate_pipeline([ROBUST, ROBUST], speedup=1.2)
    for weight in (0.0, -1.0, float("nan")):
        with pytest.raises(pk.ConfigError, match=r"stage 'fragile': weight=.* must be a finite number > 0"):
            allocate_pipeline([ROBUST, PipelineStage(**{**FRAGILE.__dict__, "weight": weight})], speedup=1.2)
    with pytest.raises(pk.ConfigError, match=r"unknown \['nope'\].*missing \['fragile'\]"):
        allocate_pipeline([ROBUST, FRAGILE], speedup=1.2, topology=[["robust", "nope"]])
    with pytest.raises(pk.ConfigError, match="exactly one of budget_ms"):
        allocate_pipeline([ROBUST], speedup=1.2, budget_ms=5.0)
    with pytest.raises(pk.ConfigError, match="speedup=0.5"):
        even_split([ROBUST], speedup=0.5)
    other = PipelineStage("other", ROBUST.table, LatencyTable(["zz"], LEVELS, {"zz": 1.0}, {"zz": [1.0] * 3}, 1.0))
    with pytest.raises(pk.ConfigError, match=r"stage 'other': latency table has no timing"):
        allocate_pipeline([other], speedup=1.2)


def _flops_lut(table: SensitivityTable) -> LatencyTable:
    """A latency table in which each group saves its share of the model's FLOPs (1 ms dense)."""
    assert table.removed is not None and table.total_flops
    saved = {u: [f / table.total_flops for f in table.removed["flops"][u]] for u in table.units}
    return LatencyTable(table.units, LEVELS, dict.fromkeys(table.units, 1.0),
                        {u: [1.0 - f for f in fs] for u, fs in saved.items()}, 1.0, "group", 1)


def test_real_models_allocate_apply_and_measure_end_to_end() -> None:
    torch.manual_seed(0)
    family = pk.ChannelConfig(ratio=0.5)
    models = {"cnn": ResidualCNN(width=16).eval(), "mlp": mlp().eval()}
    inputs = {"cnn": torch.randn(1, 1, 8, 8), "mlp": torch.randn(1, 1, 8, 8)}
    stages = []
    for name, model in models.items():
        x = inputs[name]
        ref = model(x).detach()
        table = sensitivity(model, family, lambda m, x=x, ref=ref: float((m(x).detach() - ref).abs().mean()),
                            LEVELS, higher_is_better=False, example_inputs=x)
        lut = _flops_lut(table)  # measure_latency_table is tested in test_allocate; timing noise is not wanted here
        stages.append(PipelineStage(name, table, lut, weight=1.0 if name == "cnn" else 0.5))
    result = allocate_pipeline(stages, speedup=1.2)
    pruned = result.apply({n: copy.deepcopy(m) for n, m in models.items()}, inputs)
    assert pk.count_params(pruned["cnn"]) + pk.count_params(pruned["mlp"]) < sum(
        pk.count_params(m) for m in models.values())
    measured = measure_pipeline({"dense": {n: (models[n], inputs[n]) for n in models},
                                 "joint": {n: (pruned[n], inputs[n]) for n in models}}, repeats=5, warmup=1)
    timed = measured["pipelines"]
    assert timed["dense"]["median_ms"] > 0 and timed["joint"]["median_ms"] > 0 and measured["repeats"] == 5
    assert timed["dense"]["speedup"] == 1.0
    with pytest.raises(pk.ConfigError, match=r"do not have the reference's stages \['cnn', 'mlp'\]"):
        measure_pipeline({"dense": {n: (models[n], inputs[n]) for n in models}, "one": {"cnn": (models["cnn"], 1)}})
    shown = result.with_measurement(measured, "joint")
    assert "end to end (measured" in shown.report() and "end to end (measured" not in result.report()
    data = json.loads(json.dumps(shown.to_dict()))
    assert set(data["stages"]) == {"cnn", "mlp"} and data["measured"]["speedup"] > 0
    with pytest.raises(pk.ConfigError, match=r"no model for stage\(s\) \['mlp'\]"):
        result.apply({"cnn": copy.deepcopy(models["cnn"])}, inputs)
