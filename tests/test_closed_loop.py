"""allocate_measured: allocate, measure the pruned copy, calibrate the table, allocate again."""

from __future__ import annotations

import copy

import pytest
import torch

import prunekit as pk
from prunekit.allocation.closed_loop import allocate_measured
from prunekit.allocation.latency import LatencyTable, measure_latency_table
from prunekit.allocation.sensitivity import sensitivity
from prunekit.allocation.sensitivity.groups import GroupPruner
from tests.models import ResidualCNN

LEVELS = [0.125, 0.25, 0.375, 0.5, 0.625, 0.75]


def _setup() -> tuple[torch.nn.Module, torch.Tensor, pk.SensitivityTable, LatencyTable]:
    """A residual CNN, its channel-group scan, and a table of a device whose time is its FLOPs
    (deterministic, unlike timings on a shared machine): each group pruned alone, counted."""
    torch.manual_seed(0)
    model = ResidualCNN(width=16).eval()
    x = torch.randn(1, 1, 16, 16)
    reference = model(x).detach()
    family = pk.ChannelConfig(ratio=0.5)
    table = sensitivity(model, family, lambda m: float((m(x).detach() - reference).abs().mean()), LEVELS,
                        higher_is_better=False, example_inputs=x)
    pruner, dense = GroupPruner(model, family, x), pk.count_flops(model, x) / 1e6
    pruned = {u: [pk.count_flops(pruner.plan_many({u: lv}).apply(copy.deepcopy(model)), x) / 1e6 for lv in LEVELS]
              for u in table.units}
    return model, x, table, LatencyTable(table.units, LEVELS, dict.fromkeys(table.units, dense), pruned, dense, "group")


def test_a_device_slower_to_gain_than_the_table_is_met_after_calibration() -> None:
    model, x, table, latency = _setup()
    dense_flops = pk.count_flops(model, x)

    def device(pruned: torch.nn.Module) -> float:  # gains only the square root of the FLOPs cut
        return (dense_flops / pk.count_flops(pruned, x)) ** 0.5

    before = copy.deepcopy(model.state_dict())
    result = allocate_measured(model, table, pk.LatencyTarget(speedup=1.3), latency, x, rounds=6,
                               tolerance=0.08, measure=device)
    assert result.measured_speedup == pytest.approx(1.3, rel=0.08), result.rounds
    assert result.measured_speedup == pytest.approx(device(result.model))
    assert len(result.rounds) >= 2  # the table's first prediction (FLOPs) overshoots this device
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())  # the dense model is untouched


def test_default_meter_times_here_interleaved() -> None:
    model, x, table, _ = _setup()
    timed = measure_latency_table(model, pk.ChannelConfig(ratio=0.5), LEVELS, x, repeats=2, warmup=1)
    result = allocate_measured(model, table, pk.LatencyTarget(speedup=1.05), timed, x, rounds=1)
    assert len(result.rounds) == 1 and result.measured_speedup > 0  # timings on a shared machine: no value asserted
    assert set(result.allocation.levels) == set(table.units)


def test_bad_rounds_are_named() -> None:
    model, x, table, latency = _setup()
    with pytest.raises(pk.ConfigError, match="rounds must be >= 1"):
        allocate_measured(model, table, pk.LatencyTarget(speedup=1.2), latency, x, rounds=0)
