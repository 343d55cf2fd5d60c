"""Numerical faults: NaN/Inf weights, degenerate norms and layers, empty data, rounding extremes.

Each fault either gets a clear prunekit error naming the layer (and the model is left as it
was) or is handled with a warning naming the layer; never a silent wrong answer.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable

import pytest
import torch
from torch import nn

import prunekit as pk
from prunekit.core.masks import SparsityRoundingWarning
from prunekit.errors import PlanError


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))


X = torch.randn(32, 8, generator=torch.Generator().manual_seed(1))


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def _unchanged(model: nn.Module, before: dict[str, torch.Tensor]) -> bool:
    after = model.state_dict()  # NaN != NaN, so compare where the NaNs are and everything else
    return after.keys() == before.keys() and all(
        torch.equal(after[k].isnan(), v.isnan()) and torch.equal(after[k].nan_to_num(), v.nan_to_num())
        for k, v in before.items())


PRUNERS: dict[str, Callable[[nn.Module], object]] = {
    "unstructured-layer": lambda m: pk.prune(m, pk.UnstructuredConfig(sparsity=0.5, scope="layer")),
    "unstructured-global": lambda m: pk.prune(m, pk.UnstructuredConfig(sparsity=0.5)),
    "nm-2:4": lambda m: pk.prune(m, pk.NMConfig(n=2, m=4)),
    "channel-l2": lambda m: pk.prune(m, pk.ChannelConfig(ratio=0.5), example_inputs=X),
    "wanda": lambda m: pk.prune(m, pk.UnstructuredConfig(sparsity=0.5, criterion="wanda", scope="layer"), data=[X]),
    "sparsegpt": lambda m: pk.prune(m, pk.UnstructuredConfig(sparsity=0.5, criterion="sparsegpt", scope="layer"),
                                    data=[X]),
    "sensitivity": lambda m: pk.sensitivity(m, pk.UnstructuredConfig(sparsity=0.5), lambda _: 1.0, levels=[0.5]),
}


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("method", list(PRUNERS))
def test_nonfinite_weight_is_refused_naming_the_layer(method: str, value: float) -> None:
    model = _mlp()
    model[2].weight.data[1, 3] = value
    before = _state(model)
    with pytest.raises(PlanError, match=r"'2(\.weight)?'.*NaN/Inf"):
        PRUNERS[method](model)
    assert _unchanged(model, before)
    assert not any(hasattr(m, "parametrizations") for m in model.modules()), "a mask was attached anyway"


def _bn_net() -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 3),
                        nn.Flatten(), nn.Linear(4 * 6 * 6, 3))
    return net.eval()


def test_nan_batchnorm_statistic_is_refused_naming_the_tensor() -> None:
    net = _bn_net()
    net[1].running_var[2] = float("nan")
    with pytest.raises(PlanError, match=r"'1\.running_var'"):
        pk.prune(net, pk.ChannelConfig(ratio=0.5, criterion="bn_scale"), example_inputs=torch.randn(1, 3, 8, 8))
    assert net[3].in_channels == 8


def test_zero_variance_batchnorm_channels_are_removed_exactly() -> None:
    """Channels whose BN has zero variance and zero scale/shift output 0: bn_scale removes them
    and the pruned network computes exactly what the original did (no 0/0 anywhere)."""
    net = _bn_net()
    dead = [0, 3, 5, 6]
    with torch.no_grad():
        net[1].running_var[dead] = 0.0
        net[1].weight[dead] = 0.0
        net[1].bias[dead] = 0.0
    x = torch.randn(4, 3, 8, 8)
    expected = net(x)
    pk.prune(net, pk.ChannelConfig(ratio=0.5, criterion="bn_scale", exclude=["3"]), example_inputs=x[:1])
    assert net[1].num_features == 4 and net[3].in_channels == 4
    out = net(x)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------------------------
# All-zero layers and inputs.


@pytest.mark.parametrize("method", ["unstructured-layer", "nm-2:4", "channel-l2", "wanda", "sparsegpt"])
def test_all_zero_layer_prunes_to_finite_weights(method: str) -> None:
    model = _mlp()
    model[0].weight.data.zero_()
    PRUNERS[method](model)
    for p in model.parameters():
        assert torch.isfinite(p).all()
    assert torch.isfinite(model(X)).all()


def test_all_zero_layer_emptied_by_global_ranking_is_warned_by_name() -> None:
    model = _mlp()
    model[2].weight.data.zero_()
    with pytest.warns(UserWarning, match=r"removes every weight of \['2\.weight'\]"):
        pk.prune(model, pk.UnstructuredConfig(sparsity=0.5))


@pytest.mark.parametrize("criterion", ["wanda", "sparsegpt"])
def test_all_zero_calibration_inputs_are_refused_naming_the_layer(criterion: str) -> None:
    """A layer that only ever saw zeros gives nothing to rank by (SparseGPT would zero it all)."""
    model = _mlp()
    before = _state(model)
    with pytest.raises(pk.CalibrationError, match=r"layer '0': every calibration input it saw is zero"):
        pk.prune(model, pk.UnstructuredConfig(sparsity=0.5, criterion=criterion, scope="layer"),
                 data=[torch.zeros(16, 8)])
    assert _unchanged(model, before)


# --------------------------------------------------------------------------------------------
# Empty calibration data.


@pytest.mark.parametrize("data", [[], [torch.empty(0, 8)], None, ()], ids=["empty-list", "empty-batch", "none",
                                                                          "empty-tuple"])
@pytest.mark.parametrize("criterion", ["wanda", "sparsegpt"])
def test_empty_calibration_data_is_a_clear_error(criterion: str, data: object) -> None:
    model = _mlp()
    before = _state(model)
    with pytest.raises(pk.CalibrationError, match="calibration|data="):
        pk.prune(model, pk.UnstructuredConfig(sparsity=0.5, criterion=criterion, scope="layer"), data=data)
    assert _unchanged(model, before)


def test_empty_calibration_data_in_a_sensitivity_scan_is_a_clear_error() -> None:
    with pytest.raises(pk.CalibrationError, match="empty"):
        pk.sensitivity(_mlp(), pk.UnstructuredConfig(sparsity=0.5, criterion="wanda", scope="layer"), lambda _: 1.0,
                       levels=[0.5], data=[])


# --------------------------------------------------------------------------------------------
# Layers of width 1, and sparsities that round to nothing or to everything.


def _narrow() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 1), nn.ReLU(), nn.Linear(1, 4))


def test_width_one_layer_unstructured_keeps_a_weight_per_layer() -> None:
    model = pk.prune(_narrow(), pk.UnstructuredConfig(sparsity=0.5, scope="layer"))
    assert all(bool((m.weight != 0).any()) for m in (model[0], model[2]))
    assert pk.sparsity(model).layers["0"] == 0.5


def test_width_one_layer_nm_is_skipped_by_name(caplog) -> None:
    with caplog.at_level(logging.WARNING):
        plan = pk.plan(_narrow(), pk.NMConfig(n=2, m=4))
    assert "2" in plan.skipped and "input dim 1" in plan.skipped["2"]
    assert any("layer '2'" in r.getMessage() for r in caplog.records)


def test_width_one_channel_group_keeps_its_channel() -> None:
    model = _narrow()
    x = torch.randn(4, 8)
    pk.prune(model, pk.ChannelConfig(ratio=0.9), example_inputs=x)
    assert model[0].out_features == 1 and model[2].in_features == 1
    assert model(x).shape == (4, 4)


def test_width_one_input_wanda_warns_that_rows_round_to_nothing() -> None:
    match = r"layer '2': sparsity 0\.5 of its 1 weights per output row rounds to 0"
    with pytest.warns(SparsityRoundingWarning, match=match):
        model = pk.prune(_narrow(), pk.UnstructuredConfig(sparsity=0.5, criterion="wanda", scope="layer"),
                         data=[torch.randn(8, 8)])
    assert pk.sparsity(model).layers["0"] == 0.5


def test_sparsity_that_rounds_to_zero_is_warned_by_name() -> None:
    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(2, 1))
    with pytest.warns(SparsityRoundingWarning, match=r"layer '1': sparsity 0\.2 of its 2 weights rounds to 0"):
        pk.prune(model, pk.UnstructuredConfig(sparsity=0.2, scope="layer"))
    assert pk.sparsity(model).layers["1"] == 0.0


def test_sparsity_that_rounds_to_the_whole_layer_keeps_one_weight() -> None:
    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(1, 1))
    match = r"layer '1': sparsity 0\.6 of its 1 weights rounds to all of them"
    with pytest.warns(SparsityRoundingWarning, match=match):
        pk.prune(model, pk.UnstructuredConfig(sparsity=0.6, scope="layer"))
    assert bool((model[1].weight != 0).all()), "a sparsity below 1 emptied the layer"


def test_ordinary_sparsity_raises_no_rounding_warning() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pk.prune(_mlp(), pk.UnstructuredConfig(sparsity=0.5, scope="layer"))
