"""Allocation: meets each target, prefers insensitive layers, explains unreachable targets."""

from __future__ import annotations

import copy
import math

import pytest
import torch

import prunekit as pk
from prunekit.allocation.allocate import (
    AllocationError,
    FlopsTarget,
    LatencyTarget,
    SizeTarget,
    SparsityTarget,
    allocate,
)
from prunekit.allocation.latency import LatencyTable, measure_latency_table
from prunekit.allocation.sensitivity import SensitivityTable, sensitivity
from prunekit.config import config_from_dict, config_to_dict
from tests.models import ResidualCNN, mlp

LEVELS = [0.5, 0.8, 0.9, 0.95]


def _table(values: dict[str, list[float]], *, params: dict[str, int] | None = None) -> SensitivityTable:
    """A hand-made table for the mlp() layers ('1': 2048, '3': 512, '5': 64 weights)."""
    params = params or {"1": 2048, "3": 512, "5": 64}
    flops = {u: 2 * n for u, n in params.items()}
    return SensitivityTable(
        units=list(values), levels=list(LEVELS), values=values, baseline=1.0, higher_is_better=True,
        family=config_to_dict(pk.UnstructuredConfig(sparsity=0.5)), params=params, flops=flops,
        total_params=sum(params.values()) + 52, total_flops=sum(flops.values()),
    )


# layer "1" barely cares, "3" cares from 0.8, "5" (the head) breaks at once
SENSITIVE_HEAD = {"1": [1.0, 0.99, 0.98, 0.97], "3": [0.99, 0.9, 0.8, 0.6], "5": [0.5, 0.3, 0.2, 0.1]}


@pytest.mark.parametrize("exact", [True, False])
def test_sparsity_target_met_and_sensitive_layers_spared(exact: bool) -> None:
    table = _table(SENSITIVE_HEAD)
    allocation = allocate(table, SparsityTarget(sparsity=0.7), exact=exact)
    levels = allocation.levels
    kept = sum(table.params[u] * (1 - lv) for u, lv in levels.items())
    assert 1 - kept / sum(table.params.values()) >= 0.7 - 1e-9
    assert allocation.achieved == pytest.approx(1 - kept / sum(table.params.values()))
    assert levels["5"] == 0.0  # the fragile head stays dense
    assert levels["1"] >= levels["3"]
    if exact:
        assert allocation.achieved == pytest.approx(0.7)
    else:
        assert all(lv in [0.0, *LEVELS] for lv in levels.values())


def test_min_and_max_level_bound_every_unit() -> None:
    table = _table(SENSITIVE_HEAD)
    allocation = allocate(table, SparsityTarget(sparsity=0.85), min_level=0.8, max_level=0.9)
    assert all(0.8 - 1e-9 <= lv <= 0.9 + 1e-9 for lv in allocation.levels.values())
    assert allocation.achieved == pytest.approx(0.85)
    assert allocation.levels["5"] == 0.8  # the fragile head sits at the band's floor
    with pytest.raises(AllocationError, match="no usable scanned level"):
        allocate(table, SparsityTarget(sparsity=0.85), min_level=0.96)


def test_allocation_beats_uniform_on_predicted_damage() -> None:
    table = _table(SENSITIVE_HEAD)
    allocation = allocate(table, SparsityTarget(sparsity=0.8), exact=False)
    uniform = sum(table.degradation(u, LEVELS.index(0.8)) for u in table.units)
    assert allocation.predicted_degradation < uniform


def test_noisy_non_monotone_curves_are_made_monotone() -> None:
    # layer "3" looks *better* at 0.95 than at 0.5: a fluke the allocator must not trust
    table = _table({"1": [1.0, 0.95, 0.9, 0.85], "3": [0.7, 0.7, 0.7, 0.99], "5": [0.5, 0.5, 0.5, 0.5]})
    allocation = allocate(table, SparsityTarget(sparsity=0.5), exact=False)
    assert allocation.levels["3"] == 0.0 and allocation.levels["1"] > 0


def test_failed_cells_are_never_chosen() -> None:
    values = {"1": [1.0, 1.0, math.nan, 1.0], "3": [1.0, 1.0, 1.0, 1.0], "5": [1.0, 1.0, 1.0, 1.0]}
    table = _table(values)
    table.failures["1@0.9"] = "evaluate returned nan"
    allocation = allocate(table, SparsityTarget(sparsity=0.5), exact=False)
    assert allocation.levels["1"] <= 0.8


def test_unreachable_target_names_binding_constraint_and_closest() -> None:
    table = _table(SENSITIVE_HEAD)
    with pytest.raises(AllocationError, match=r"SparsityTarget.sparsity=0.97.*highest allowed level \(0.95\)"
                       r".*closest achievable parameter sparsity is 0.95"):
        allocate(table, SparsityTarget(sparsity=0.97))
    with pytest.raises(AllocationError, match=r"highest allowed level \(0.8\).*closest achievable.*0.8"):
        allocate(table, SparsityTarget(sparsity=0.9), max_level=0.8)


def test_flops_and_size_targets_on_a_real_scan(tmp_path) -> None:
    torch.manual_seed(0)
    model = mlp()
    x, y = torch.randn(32, 1, 8, 8), torch.randint(0, 4, (32,))
    table = sensitivity(model, pk.UnstructuredConfig(sparsity=0.5), pk.proxy_loss([(x, y)]), LEVELS,
                        higher_is_better=False, example_inputs=x[:1])
    flops = allocate(table, FlopsTarget(reduction=0.6))
    assert flops.achieved == pytest.approx(0.6)
    pruned = pk.prune(copy.deepcopy(model), flops.to_config())
    sparse_flops = sum(table.flops[u] * (1 - lv) for u, lv in pk.sparsity(pruned).layers.items())
    assert sparse_flops / table.total_flops == pytest.approx(0.4, abs=0.01)

    budget = 6000
    size = allocate(table, SizeTarget(size_bytes=budget))
    pruned = pk.finalize(pk.prune(copy.deepcopy(model), size.to_config()))
    saved = pk.save(pruned, tmp_path / "m.safetensors")
    assert size.achieved <= budget and saved.size_bytes <= budget  # the prediction is an upper bound


def test_to_config_emits_per_layer_rules_that_prune() -> None:
    table = _table(SENSITIVE_HEAD)
    allocation = allocate(table, SparsityTarget(sparsity=0.7), exact=False)
    rules = allocation.to_config(pk.UnstructuredConfig(sparsity=0.5, exclude=["5"]))
    assert isinstance(rules, pk.PerLayer) and rules.rules["5"] is None
    assert all(c.scope == "layer" and c.exclude == () for c in rules.rules.values() if c is not None)
    assert config_from_dict(config_to_dict(rules)) == rules  # a recipe round trip
    model = pk.prune(mlp(), rules)
    measured = pk.sparsity(model).layers
    assert all(measured[u] == pytest.approx(lv, abs=1e-3) for u, lv in allocation.levels.items())
    half = allocate(table, SparsityTarget(sparsity=0.4), max_level=0.5, exact=False)
    nm = half.to_config(pk.NMConfig(n=2, m=4))  # another config family: 2:4 where the level is 0.5
    assert {u for u, c in nm.rules.items() if c is not None} == {u for u, lv in half.levels.items() if lv}
    pruned = [u for u, lv in half.levels.items() if lv]
    assert pk.check_nm(pk.finalize(pk.prune(mlp(), nm)), 2, 4, layers=pruned).ok


def test_target_configs_validate_and_round_trip() -> None:
    with pytest.raises(pk.ConfigError, match="SparsityTarget.sparsity"):
        SparsityTarget(sparsity=1.5)
    with pytest.raises(pk.ConfigError, match="FlopsTarget.reduction"):
        FlopsTarget(reduction=0.0)
    target = SizeTarget(size_bytes=1000)
    assert config_from_dict(config_to_dict(target)) == target


def _lut(dense: dict[str, float], pruned: dict[str, list[float]], model_ms: float) -> LatencyTable:
    return LatencyTable(list(dense), list(LEVELS), dense, pruned, model_ms, "layer", 1)


def test_latency_target_uses_the_measured_table(tmp_path) -> None:
    table = _table(SENSITIVE_HEAD)
    # layer "1" gets much faster when pruned, "3" a little, "5" not at all
    lut = _lut({"1": 4.0, "3": 2.0, "5": 1.0},
               {"1": [3.0, 2.0, 1.5, 1.0], "3": [1.9, 1.8, 1.7, 1.6], "5": [1.0] * 4}, model_ms=10.0)
    allocation = allocate(table, LatencyTarget(speedup=1.25), latency=lut)
    assert allocation.achieved == pytest.approx(1.25)
    assert allocation.levels["5"] == 0.0 and allocation.levels["1"] > 0
    saved = 10.0 - 10.0 / allocation.achieved
    assert saved == pytest.approx(2.0)
    loaded = LatencyTable.load(lut.save(tmp_path / "lut.json"))
    assert loaded == lut
    with pytest.raises(AllocationError, match=r"speedup=2.0.*closest achievable measured-LUT speed-up is 1.515"):
        allocate(table, LatencyTarget(speedup=2.0), latency=lut)
    with pytest.raises(pk.ConfigError, match="needs latency="):
        allocate(table, LatencyTarget(speedup=1.1))


def test_calibrated_table_matches_the_measured_point_and_round_trips(tmp_path) -> None:
    table = _table(SENSITIVE_HEAD)
    lut = _lut({"1": 4.0, "3": 2.0, "5": 1.0},
               {"1": [3.0, 2.0, 1.5, 1.0], "3": [1.9, 1.8, 1.7, 1.6], "5": [1.0] * 4}, model_ms=10.0)
    first = allocate(table, LatencyTarget(speedup=1.25), latency=lut)  # predicts 2.0 ms saved
    calibrated = lut.calibrated(first.achieved, measured_speedup=10 / 9)  # only 1.0 ms measured
    assert calibrated.saving_scale == pytest.approx(0.5) and lut.saving_scale == 1.0
    again = allocate(table, LatencyTarget(speedup=1.15), latency=calibrated)
    assert again.achieved == pytest.approx(1.15)  # now predicts 1.3 ms saved: more than 1.0 measured
    assert sum(again.levels.values()) > sum(first.levels.values())
    assert LatencyTable.load(calibrated.save(tmp_path / "lut.json")) == calibrated
    with pytest.raises(pk.ConfigError, match="must be > 1"):
        lut.calibrated(1.25, 0.9)


def test_measured_latency_table_for_masks_says_dense_shapes_do_not_speed_up() -> None:
    model = mlp()
    x = torch.randn(1, 1, 8, 8)
    lut = measure_latency_table(model, pk.UnstructuredConfig(sparsity=0.5), LEVELS, x, repeats=3, warmup=1)
    assert lut.units == ["1", "3", "5"] and lut.model_ms > 0
    assert all(m.training for m in model.modules())  # a model in training mode stays so
    assert all(v > 0 for u in lut.units for v in [lut.dense_ms[u], *lut.latency_ms[u]])
    assert "model" in lut.summary()
    table = sensitivity(model, pk.UnstructuredConfig(sparsity=0.5), lambda m: 1.0, LEVELS)
    with pytest.raises(AllocationError, match="masks keep dense shapes"):
        allocate(table, LatencyTarget(speedup=5.0), latency=lut)


def test_channel_groups_allocate_flops_and_apply_in_place() -> None:
    torch.manual_seed(0)
    model = ResidualCNN(width=8).eval()
    x = torch.randn(1, 1, 8, 8)
    reference = model(x).detach()
    family = pk.ChannelConfig(ratio=0.5)
    table = sensitivity(model, family, lambda m: float((m(x).detach() - reference).abs().mean()), [0.25, 0.5, 0.75],
                        higher_is_better=False, example_inputs=x)
    allocation = allocate(table, FlopsTarget(reduction=0.3), exact=False)
    with pytest.raises(pk.ConfigError, match="Allocation.apply"):
        allocation.to_config()
    target = copy.deepcopy(model)
    pruned = allocation.apply(target, x)
    assert pruned is target  # Allocation.apply mutates and returns the model, for groups as for layers
    assert pk.count_params(model) == sum(p.numel() for p in ResidualCNN(width=8).parameters())  # scan left it intact
    measured = 1 - pk.count_flops(pruned, x) / pk.count_flops(model, x)
    assert measured >= 0.3 - 0.05  # additive prediction vs the measured FLOPs of the pruned copy
    lut = measure_latency_table(model, family, table.levels, x, repeats=2, warmup=1)
    assert lut.kind == "group" and set(lut.units) == set(table.units)
    assert not any(m.training for m in model.modules())  # timing left the eval model in eval mode
