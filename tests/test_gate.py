"""The gate checks real reports against budgets, by exit code and one line per broken budget."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from typer.testing import CliRunner

import prunekit as pk
from prunekit.cli import app
from prunekit.measure.gate import Budget, check_report, load_budget
from prunekit.measure.report import compare, write_report

runner = CliRunner()


def _trained(seed: int, hidden: int):
    torch.manual_seed(seed)
    x = torch.randn(400, 20)
    y = x[:, :4].argmax(1)
    model = nn.Sequential(nn.Linear(20, hidden), nn.ReLU(), nn.Linear(hidden, 4))
    pk.finetune(model, DataLoader(TensorDataset(x, y), batch_size=32, shuffle=True), epochs=5, lr=1e-2,
                progress=False)
    return model, DataLoader(TensorDataset(x, y), batch_size=100)


@pytest.fixture(scope="module")
def reports(tmp_path_factory):
    """report.json files: light and heavy pruning of one model, and a report of another model."""
    baseline, data = _trained(0, 64)
    other, _ = _trained(1, 32)
    out = {}
    for name, model, level in (("light", baseline, 0.3), ("heavy", baseline, 0.97), ("other", other, 0.3)):
        pruned = pk.finalize(pk.prune(copy.deepcopy(model), pk.UnstructuredConfig(sparsity=level, scope="layer")))
        report = compare(model, pruned, data, batch_sizes=(1, 8), repeats=6, warmup=1, title="gate test model")
        out[name] = write_report(report, tmp_path_factory.mktemp(name)) / "report.json"
    return out


def _budget(tmp_path, **fields) -> str:
    path = tmp_path / "budget.yaml"
    path.write_text("".join(f"{k}: {v}\n" for k, v in fields.items()))
    return str(path)


def test_a_budget_that_holds_exits_zero(reports, tmp_path) -> None:
    data = json.loads(reports["light"].read_text())
    budget = _budget(tmp_path, max_accuracy_drop_points=50, max_size_bytes=data["pruned"]["size_bytes"],
                     min_sparsity=0.25, max_latency_ms_p99=10_000, batch_size=8, max_segment_drop_points=100)
    result = runner.invoke(app, ["check", str(reports["light"]), "--budget", budget])
    assert result.exit_code == 0, result.output
    assert result.output.strip() == "all budgets met"


def test_broken_budgets_exit_one_with_one_line_each(reports, tmp_path) -> None:
    data = json.loads(reports["heavy"].read_text())
    drop = 100 * (data["baseline"]["accuracy"] - data["pruned"]["accuracy"])
    assert drop > 5  # 97 % of every layer's weights gone: the premise of this test
    budget = _budget(tmp_path, max_accuracy_drop_points=1, max_size_bytes=100, min_sparsity=0.99,
                     max_latency_ms_p99=1e-6, batch_size=1)
    result = runner.invoke(app, ["check", str(reports["heavy"]), "--budget", budget])
    assert result.exit_code == 1, result.output
    lines = [line for line in result.output.splitlines() if line.startswith("budget broken: ")]
    assert len(lines) == 4, result.output
    assert lines[0].startswith(f"budget broken: accuracy drop {drop:.2f} points > budget 1 (")
    assert "beyond noise" in lines[0]  # a drop of this size on 400 examples is not noise
    assert lines[1].startswith("budget broken: latency p99 at batch 1: ") and "> budget 1e-06 ms" in lines[1]
    assert lines[2] == f"budget broken: size: {data['pruned']['size_bytes']:,} B > budget 100 B"
    assert lines[3].startswith("budget broken: sparsity: 9") and "< budget 99.00%" in lines[3]


def test_segment_budget_names_the_class(reports) -> None:
    data = json.loads(reports["heavy"].read_text())
    worst = min(data["accuracy"]["per_class"], key=lambda r: r["delta"])
    result = check_report(data, Budget(max_segment_drop_points=-100 * worst["delta"] - 0.01))
    assert not result.passed and any(line.startswith(f"class {worst['class']!r} dropped") for line in result.broken)
    assert check_report(data, Budget(max_segment_drop_points=-100 * worst["delta"])).passed


def test_previous_report_gives_a_diff_and_can_fail_on_regression(reports, tmp_path) -> None:
    budget = _budget(tmp_path, fail_on_regression="true")
    result = runner.invoke(app, ["check", str(reports["heavy"]), "--budget", budget,
                                 "--previous", str(reports["light"])])
    assert result.exit_code == 1, result.output
    assert "budget broken: regressed beyond noise: pruned accuracy " in result.output
    assert "since the previous report: pruned accuracy " in result.output
    assert "since the previous report: speed-up at batch 1 " in result.output
    data, old = (json.loads(reports[n].read_text()) for n in ("heavy", "light"))
    improved = check_report(old, Budget(fail_on_regression=True), previous=data)
    assert improved.diff and not any("accuracy" in line for line in improved.broken)  # an improvement is no regression
    assert check_report(data, Budget(), previous=old).passed  # and without fail_on_regression it only reports


def test_reports_of_different_models_are_refused(reports, tmp_path) -> None:
    result = runner.invoke(app, ["check", str(reports["other"]), "--budget", _budget(tmp_path, min_sparsity=0.1),
                                 "--previous", str(reports["light"])])
    assert result.exit_code == 2
    assert "refusing to compare reports of different models or data" in result.output
    assert "baseline params: 1604 (previous) vs 804 (new)" in result.output


def test_budget_with_an_unknown_key_is_an_error_naming_it(reports, tmp_path) -> None:
    path = _budget(tmp_path, max_acuracy_drop_points=1)
    with pytest.raises(pk.ConfigError, match="max_acuracy_drop_points"):
        load_budget(path)
    result = runner.invoke(app, ["check", str(reports["light"]), "--budget", path])
    assert result.exit_code == 2 and "max_acuracy_drop_points" in result.output
    with pytest.raises(pk.ConfigError, match="min_sparsity"):
        Budget(min_sparsity=1.5)


def test_latency_budget_at_an_unmeasured_batch_size_is_an_error(reports, tmp_path) -> None:
    result = runner.invoke(app, ["check", str(reports["light"]), "--budget",
                                 _budget(tmp_path, max_latency_ms_p99=5, batch_size=32)])
    assert result.exit_code == 2 and "batch sizes 1, 8 only" in result.output
