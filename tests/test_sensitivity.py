"""Sensitivity scans: the model ends unchanged, failures are reported, tables round-trip."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import prunekit as pk
from prunekit.allocation.sensitivity import SensitivityError, SensitivityTable, proxy_loss, sensitivity
from prunekit.allocation.sensitivity.groups import channel_groups
from tests.models import ResidualCNN, mlp


def _data(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(32, 1, 8, 8, generator=g), torch.randint(0, 4, (32,), generator=g)


def _trained_mlp() -> nn.Module:
    torch.manual_seed(0)
    model = mlp()
    x, y = _data()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(30):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    return model


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_scan_leaves_model_unchanged_and_measures_every_cell() -> None:
    model = _trained_mlp()
    x, y = _data()
    before, params = _state(model), [id(p) for p in model.parameters()]
    model.train()
    table = sensitivity(model, pk.UnstructuredConfig(sparsity=0.5), proxy_loss([(x, y)], n_batches=1),
                        levels=[0.5, 0.9, 0.99], higher_is_better=False, example_inputs=x[:1])
    after = model.state_dict()
    assert list(after) == list(before)
    for key, value in before.items():
        torch.testing.assert_close(after[key], value, rtol=0, atol=0)
    assert [id(p) for p in model.parameters()] == params  # an optimizer's references stay valid
    assert model.training
    assert table.units == ["1", "3", "5"] and table.levels == [0.5, 0.9, 0.99]
    assert all(len(v) == 3 and all(math.isfinite(c) for c in v) for v in table.values.values())
    # pruning a layer harder hurts more on a trained model, at the extremes
    assert all(table.degradation(u, 2) > table.degradation(u, 0) for u in table.units)
    assert table.params == {"1": 64 * 32, "3": 32 * 16, "5": 16 * 4}
    assert table.flops == {"1": 2 * 64 * 32, "3": 2 * 32 * 16, "5": 2 * 16 * 4}


def test_scan_restores_existing_masks() -> None:
    model = pk.prune(_trained_mlp(), pk.UnstructuredConfig(sparsity=0.3, scope="layer"))
    masks = {k: v.clone() for k, v in pk.core.masks.mask_state_dict(model).items()}
    x, y = _data()
    sensitivity(model, pk.UnstructuredConfig(sparsity=0.5), proxy_loss([(x, y)]), levels=[0.8],
                higher_is_better=False)
    after = pk.core.masks.mask_state_dict(model)
    assert masks.keys() == after.keys()
    assert all(torch.equal(masks[k], after[k]) for k in masks)


def test_failing_evaluate_is_reported_and_scan_continues_or_stops() -> None:
    model = _trained_mlp()
    calls = {"n": 0}

    @torch.no_grad()
    def evaluate(m: nn.Module) -> float:
        calls["n"] += 1
        if float(m[5].weight.abs().sum()) < 0.5 * float(reference):  # layer "5" pruned hard
            raise RuntimeError("boom")
        return float("nan") if float((m[3].weight == 0).float().mean()) > 0.8 else 1.0

    reference = model[5].weight.abs().sum().detach()
    table = sensitivity(model, pk.UnstructuredConfig(sparsity=0.5), evaluate, levels=[0.2, 0.9])
    assert math.isnan(table.values["5"][1]) and "RuntimeError: boom" in table.failures["5@0.9"]
    assert math.isnan(table.values["3"][1]) and "nan" in table.failures["3@0.9"]
    assert table.values["1"] == [1.0, 1.0]
    assert "fail" in table.summary()
    with pytest.raises(SensitivityError, match="layer '3' at level 0.9"):
        sensitivity(model, pk.UnstructuredConfig(sparsity=0.5), evaluate, levels=[0.2, 0.9], on_error="stop")
    assert float((model[3].weight == 0).float().mean()) == 0.0  # restored even when it stopped


def test_baseline_failure_and_bad_levels_raise() -> None:
    model = mlp()
    with pytest.raises(SensitivityError, match="unpruned model"):
        sensitivity(model, pk.UnstructuredConfig(sparsity=0.5), lambda m: float("inf"), levels=[0.5])
    with pytest.raises(pk.ConfigError, match="levels"):
        sensitivity(model, pk.UnstructuredConfig(sparsity=0.5), lambda m: 1.0, levels=[1.0])


def test_exclude_limits_the_scanned_layers() -> None:
    table = sensitivity(mlp(), pk.UnstructuredConfig(sparsity=0.5, exclude=["5"]), lambda m: 1.0, levels=[0.5])
    assert table.units == ["1", "3"]
    assert table.total_params == pk.count_params(mlp())


def test_table_json_round_trip_and_heat_map(tmp_path) -> None:
    model = _trained_mlp()
    x, y = _data()
    table = sensitivity(model, pk.UnstructuredConfig(sparsity=0.5), proxy_loss([(x, y)]), levels=[0.5, 0.9],
                        higher_is_better=False, example_inputs=x[:1])
    table.values["3"][0] = math.nan
    table.failures["3@0.5"] = "evaluate returned nan"
    path = table.save(tmp_path / "sens.json")
    loaded = SensitivityTable.load(path)
    assert loaded.units == table.units and loaded.failures == table.failures
    assert math.isnan(loaded.values["3"][0]) and loaded.values["1"] == table.values["1"]
    assert loaded.config() == pk.UnstructuredConfig(sparsity=0.5)
    png = table.plot(tmp_path / "sens.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    (tmp_path / "bad.json").write_text('{"format": "other"}')
    with pytest.raises(pk.ConfigError, match="not a sensitivity table"):
        SensitivityTable.load(tmp_path / "bad.json")


def test_proxy_loss_uses_fixed_batches() -> None:
    x, y = _data()
    evaluate = proxy_loss(iter([(x[:16], y[:16]), (x[16:], y[16:]), (x, y)]), n_batches=2)
    model = mlp()
    with torch.no_grad():
        expected = float(nn.functional.cross_entropy(model(x), y))
    assert evaluate(model) == pytest.approx(expected, rel=1e-5)
    assert evaluate(model) == pytest.approx(expected, rel=1e-5)  # not consumed by the first call
    with pytest.raises(pk.ConfigError, match="empty"):
        proxy_loss([])


def test_channel_group_scan_on_residual_cnn() -> None:
    torch.manual_seed(0)
    model = ResidualCNN(width=8).eval()
    x = torch.randn(2, 1, 8, 8)
    before = _state(model)
    reference = model(x).detach()
    table = sensitivity(model, pk.ChannelConfig(ratio=0.5), lambda m: float((m(x).detach() - reference).abs().mean()),
                        levels=[0.25, 0.5], higher_is_better=False, example_inputs=x)
    assert table.kind == "group" and len(table.units) >= 2
    assert all(r[0] < r[1] for r in table.removed["params"].values())  # more ratio, more removed
    # the trace-once scan removes what a plan with every other group excluded removes
    name = table.units[0]
    others = [layer for n, g in channel_groups(model, pk.ChannelConfig(ratio=0.5), x).items() if n != name
              for layer in g.layers]
    stats = pk.plan(model, pk.ChannelConfig(ratio=0.5, exclude=others), x).stats
    assert table.removed["params"][name][1] == stats["params_before"] - stats["params_after"]
    assert all(math.isfinite(v) for vs in table.values.values() for v in vs)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_cli_sensitivity_writes_table_plot_and_allocation(tmp_path) -> None:
    import yaml
    from typer.testing import CliRunner

    from prunekit.cli import app

    recipe = {
        "_type": "Recipe",
        "model": "tests.recipe_entry_points:build_model",
        "data": "tests.recipe_entry_points:loaders",
        "prune": {"_type": "UnstructuredConfig", "sparsity": 0.5},
    }
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    out = tmp_path / "out"
    args = ["sensitivity", "--recipe", str(path), "--out", str(out), "--levels", "0.5,0.8,0.95",
            "--metric", "loss", "--input-shape", "1,12", "--target-sparsity", "0.7", "--no-progress"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    table = SensitivityTable.load(out / "sensitivity.json")
    assert table.units == ["0", "2"] and not table.higher_is_better and table.flops is not None
    assert (out / "sensitivity.png").stat().st_size > 0
    rules = pk.load_recipe(out / "allocation.yaml")
    pruned = pk.prune(__import__("tests.recipe_entry_points").recipe_entry_points.build_model(), rules)
    assert pk.sparsity(pruned).total == pytest.approx(0.7, abs=0.01)
    bad = CliRunner().invoke(app, args[:-1] + ["--metric", "f1"])
    assert bad.exit_code == 2 and "--metric" in bad.output


def test_calibration_criterion_scan_and_allocation_with_wanda() -> None:
    model = _trained_mlp()
    x, y = _data()
    before = _state(model)
    config = pk.UnstructuredConfig(sparsity=0.5, criterion="wanda")
    table = sensitivity(model, config, proxy_loss([(x, y)]), [0.5, 0.9], higher_is_better=False,
                        data=[x[:16], x[16:]])
    assert all(math.isfinite(v) for vs in table.values.values() for v in vs)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    rules = pk.allocate(table, pk.SparsityTarget(sparsity=0.6)).to_config()
    assert {c.criterion for c in rules.rules.values() if c is not None} == {"wanda"}
    pruned = pk.prune(model, rules, data=[x])
    assert pk.sparsity(pruned).total == pytest.approx(0.6, abs=0.01)
