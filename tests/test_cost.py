"""Serving cost from a report's measured latency: hosts and yearly cost dense vs pruned, the math shown."""

from __future__ import annotations

import copy
import json

import pytest
from typer.testing import CliRunner

import prunekit as pk
from prunekit.cli import app
from prunekit.measure.cost import CostQuery, cost_block, cost_markdown
from prunekit.measure.report import compare, with_cost
from prunekit.measure.report_render import render_html, render_markdown
from tests.recipe_entry_points import build_model, loaders


def _report(**speed_call: str) -> dict:
    """A report dict's latency section, as compare writes it (ms per batch)."""
    rows = [{"batch_size": 1, "baseline_ms_p50": 1.0, "baseline_ms_p99": 2.0, "pruned_ms_p50": 0.5,
             "pruned_ms_p99": 1.0, "speed_call": "faster"},
            {"batch_size": 8, "baseline_ms_p50": 10.0, "baseline_ms_p99": 16.0, "pruned_ms_p50": 5.0,
             "pruned_ms_p99": 8.0, "speed_call": speed_call.get("call", "faster")},
            {"batch_size": 7, "baseline_ms_p50": 2.1, "baseline_ms_p99": 2.1, "pruned_ms_p50": 2.1,
             "pruned_ms_p99": 2.1, "speed_call": "no measurable difference"}]
    return {"latency": {"by_batch": rows}}


def test_hosts_and_yearly_cost_match_a_hand_count() -> None:
    c = cost_block(_report(), CostQuery(qps=1500, serving_batch=8, price_per_host_hour=2.5))
    # dense: p99 8 / 0.016 s = 500/s per host -> ceil(1500 / 500) = 3; p50 8 / 0.010 s = 800/s -> ceil(1.875) = 2
    # pruned: p99 8 / 0.008 s = 1000/s -> ceil(1.5) = 2; p50 8 / 0.005 s = 1600/s -> 1
    assert c["baseline"]["p99"] == pytest.approx({"latency_ms": 16.0, "throughput_qps": 500.0, "hosts": 3})
    assert c["baseline"]["p50"] == pytest.approx({"latency_ms": 10.0, "throughput_qps": 800.0, "hosts": 2})
    assert c["pruned"]["p99"]["hosts"] == 2 and c["pruned"]["p50"]["hosts"] == 1
    assert c["statistic"] == "p99" and c["baseline"]["hosts"] == 3 and c["pruned"]["hosts"] == 2
    assert c["baseline"]["yearly_cost"] == pytest.approx(3 * 2.5 * 8760)  # 65,700
    assert c["pruned"]["yearly_cost"] == pytest.approx(2 * 2.5 * 8760)  # 43,800
    assert c["hosts_saved"] == 1 and c["yearly_saving"] == pytest.approx(21900)

    by_median = cost_block(_report(), CostQuery(qps=1500, serving_batch=8, statistic="p50"))
    assert (by_median["baseline"]["hosts"], by_median["pruned"]["hosts"]) == (2, 1)
    assert by_median["baseline"]["yearly_cost"] is None and by_median["yearly_saving"] is None


def test_an_exact_fit_costs_no_extra_host() -> None:
    # 7 / 0.0021 s is 3,333.33/s; 10,000 QPS is exactly 3 hosts, though 10000 / (7 / 0.0021) is 3.0000000000000004
    c = cost_block(_report(), CostQuery(qps=10_000, serving_batch=7))
    assert c["baseline"]["hosts"] == c["pruned"]["hosts"] == 3
    assert cost_block(_report(), CostQuery(qps=0.001, serving_batch=1))["pruned"]["hosts"] == 1  # never 0 hosts


def test_the_markdown_shows_the_formula_with_the_measured_numbers() -> None:
    d = {**_report(), "environment": {"cpu": "Test CPU"}}
    md = "\n".join(cost_markdown(cost_block(d, CostQuery(qps=1500, serving_batch=8, price_per_host_hour=2.5)),
                                  "Test CPU"))
    formula = "hosts = ceil(QPS / (batch × 1,000 / p99 latency in ms)) = "
    assert f"- dense: {formula}ceil(1,500 / (8 × 1,000 / 16)) = ceil(1,500 / 500) = 3" in md
    assert f"- pruned: {formula}ceil(1,500 / (8 × 1,000 / 8)) = ceil(1,500 / 1,000) = 2" in md
    assert "- dense: yearly cost = hosts × price per host-hour × 8,760 h = 3 × 2.5 × 8,760 = 65,700.00" in md
    assert "| dense | 10.000 | 800 | 2 | 16.000 | 500 | 3 | 65,700.00 |" in md
    assert "on Test CPU" in md
    assert "hosts for 1,500 QPS at batch 8 (sized by p99): 3 dense vs 2 pruned; yearly 65,700.00 vs 43,800.00 " \
           "(saves 21,900.00)." in md


def test_a_difference_within_the_noise_is_called_so() -> None:
    c = cost_block(_report(call="no measurable difference"), CostQuery(qps=1500, serving_batch=8))
    assert "within the run's noise" in "\n".join(cost_markdown(c))
    measured = cost_block(_report(), CostQuery(qps=1500, serving_batch=8))
    assert "within the run's noise" not in "\n".join(cost_markdown(measured))


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"qps": 0, "serving_batch": 8}, r"CostQuery\.qps: .*greater than 0"),
    ({"qps": -5, "serving_batch": 8}, r"CostQuery\.qps"),
    ({"qps": float("inf"), "serving_batch": 8}, r"CostQuery\.qps"),
    ({"qps": 10, "serving_batch": 8, "price_per_host_hour": 0}, r"CostQuery\.price_per_host_hour"),
    ({"qps": 10, "serving_batch": 0}, r"CostQuery\.serving_batch"),
    ({"qps": 10, "serving_batch": 8, "statistic": "p90"}, r"CostQuery\.statistic"),
    ({"qps": 10, "serving_batch": 8, "hosts": 3}, r"CostQuery\.hosts"),
])
def test_bad_queries_name_the_field(kwargs: dict, message: str) -> None:
    with pytest.raises(pk.ConfigError, match=message):
        CostQuery(**kwargs)


def test_an_unmeasured_batch_size_names_the_measured_ones() -> None:
    with pytest.raises(pk.ConfigError, match=r"batch size 32 was not measured by the report \(measured: 1, 8, 7\)"):
        cost_block(_report(), CostQuery(qps=10, serving_batch=32))
    with pytest.raises(pk.ConfigError, match="no latency.by_batch"):
        cost_block({}, CostQuery(qps=10, serving_batch=8))


@pytest.fixture(scope="module")
def pair():
    baseline = build_model()
    pruned = pk.finalize(pk.prune(copy.deepcopy(baseline), pk.UnstructuredConfig(sparsity=0.5)))
    return baseline, pruned, loaders()[1]


def test_compare_with_cost_uses_its_own_latency(pair) -> None:
    baseline, pruned, data = pair
    query = CostQuery(qps=50_000, serving_batch=4, price_per_host_hour=1.0)
    with pytest.raises(pk.ConfigError, match=r"measured: 1, 4\)"):  # refused before anything is timed
        compare(baseline, pruned, data, batch_sizes=(1, 4), repeats=2, warmup=0,
                cost=CostQuery(qps=10, serving_batch=8))
    d = compare(baseline, pruned, data, batch_sizes=(1, 4), repeats=3, warmup=0, cost=query).data
    row = d["latency"]["by_batch"][1]
    for name in ("baseline", "pruned"):
        throughput = 4 / (row[f"{name}_ms_p99"] / 1000)
        assert d["cost"][name]["p99"]["throughput_qps"] == pytest.approx(throughput)
        assert d["cost"][name]["hosts"] == -(-50_000 // throughput)
        assert d["cost"][name]["yearly_cost"] == pytest.approx(d["cost"][name]["hosts"] * 8760)
    assert d["verdicts"][-1].startswith("hosts for 50,000 QPS at batch 4 (sized by p99): ")
    assert json.loads(json.dumps(d))["cost"] == d["cost"]  # JSON-safe
    markdown = render_markdown(d)
    assert "## Serving cost" in markdown
    assert f"= ceil(50,000 / (4 × 1,000 / {row['baseline_ms_p99']:.4g}))" in markdown
    assert "With 3 timed calls the p99 is close to the slowest call" in markdown
    html = render_html(d, pngs={})
    assert "<h2>Serving cost</h2>" in html and "<th>hosts p99</th>" in html

    # applied after, to a report without cost (e.g. a loaded report.json), without changing it
    plain = {k: v for k, v in d.items() if k != "cost"}
    again = with_cost(plain, query).data
    assert again["cost"] == d["cost"] and "cost" not in plain


def _checkpoints(tmp_path, pair) -> list[str]:
    baseline, pruned, _ = pair
    pk.save(baseline, tmp_path / "dense.safetensors")
    pk.save(pruned, tmp_path / "pruned.safetensors")
    return ["report", "--model", "tests.recipe_entry_points:build_model", "--data", "tests.recipe_entry_points:loaders",
            "--baseline", str(tmp_path / "dense.safetensors"), "--pruned", str(tmp_path / "pruned.safetensors"),
            "--out", str(tmp_path / "report"), "--batch-sizes", "1,4", "--repeats", "3", "--warmup", "0"]


def test_cli_report_with_cost_and_segments(tmp_path, pair) -> None:
    names = tmp_path / "segments.txt"
    examples = len(pair[2].dataset)
    names.write_text("".join("odd\n" if i % 2 else "even\n" for i in range(examples)))
    args = _checkpoints(tmp_path, pair)
    result = CliRunner().invoke(app, [*args, "--qps", "2000", "--serving-batch", "4", "--price-per-host-hour", "0.5",
                                      "--segments", str(names)])
    assert result.exit_code == 0, result.output
    d = json.loads((tmp_path / "report" / "report.json").read_text())
    assert d["cost"]["qps"] == 2000 and d["cost"]["price_per_host_hour"] == 0.5
    assert [r["segment"] for r in d["accuracy"]["segments"]["rows"]] == ["even", "odd"]
    assert [r["count"] for r in d["accuracy"]["segments"]["rows"]] == [examples // 2, examples // 2]
    assert "hosts for 2,000 QPS at batch 4" in result.output
    assert "<h2>Serving cost</h2>" in (tmp_path / "report" / "report.html").read_text()


@pytest.mark.parametrize(("extra", "message"), [
    (["--qps", "0", "--serving-batch", "4"], "--qps must be positive, got 0.0"),
    (["--qps", "10", "--serving-batch", "4", "--price-per-host-hour", "-1"], "--price-per-host-hour must be positive"),
    (["--qps", "10"], "--qps needs --serving-batch"),
    (["--serving-batch", "4"], "need --qps"),
    (["--qps", "10", "--serving-batch", "32"], "--serving-batch 32 is not among --batch-sizes '1,4'"),
    (["--segments", "tests.recipe_entry_points:not_a_model"], "returned str"),
    (["--segments", "no_such_segments.txt"], "--segments file 'no_such_segments.txt' cannot be read"),
])
def test_cli_bad_cost_or_segment_options_exit_2_naming_the_option(tmp_path, pair, extra, message) -> None:
    result = CliRunner().invoke(app, [*_checkpoints(tmp_path, pair), *extra])
    assert result.exit_code == 2, result.output
    assert message in " ".join(result.output.split())
    assert not (tmp_path / "report" / "report.json").exists()


def test_cli_segments_entry_point_returning_a_function(tmp_path, pair, monkeypatch) -> None:
    import tests.recipe_entry_points as entry_points

    monkeypatch.setattr(entry_points, "by_sign", lambda: lambda x: "pos" if float(x[0]) > 0 else "neg", raising=False)
    result = CliRunner().invoke(app, [*_checkpoints(tmp_path, pair), "--segments", "tests.recipe_entry_points:by_sign"])
    assert result.exit_code == 0, result.output
    d = json.loads((tmp_path / "report" / "report.json").read_text())
    x = pair[2].dataset.tensors[0]
    counts = {r["segment"]: r["count"] for r in d["accuracy"]["segments"]["rows"]}
    assert counts == {"pos": int((x[:, 0] > 0).sum()), "neg": int((x[:, 0] <= 0).sum())}
