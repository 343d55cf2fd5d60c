"""The validation report measures what it claims and renders to JSON, Markdown and HTML."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import prunekit as pk
from prunekit.measure.report import compare, write_report


@pytest.fixture(scope="module")
def models_and_data():
    torch.manual_seed(0)
    x = torch.randn(400, 20)
    y = (x[:, :4].argmax(1)).long()
    data = DataLoader(TensorDataset(x, y), batch_size=100)
    baseline = nn.Sequential(nn.Linear(20, 64), nn.ReLU(), nn.Linear(64, 4))
    pk.finetune(baseline, DataLoader(TensorDataset(x, y), batch_size=32, shuffle=True), epochs=5, lr=1e-2,
                progress=False)
    pruned = pk.finalize(pk.prune(copy.deepcopy(baseline), pk.UnstructuredConfig(sparsity=0.8)))
    return baseline, pruned, data


def test_compare_measures_accuracy_margin_and_size(models_and_data, tmp_path) -> None:
    baseline, pruned, data = models_and_data
    report = compare(baseline, pruned, data, batch_sizes=(1, 8), repeats=3, warmup=1, seed=7)
    d = report.data
    assert d["baseline"]["accuracy"] == pytest.approx(pk.accuracy(baseline, data))
    assert d["pruned"]["accuracy"] == pytest.approx(pk.accuracy(pruned, data))
    assert d["pruned"]["sparsity"] == pytest.approx(0.8, abs=0.01)
    assert d["pruned"]["size_bytes"] < 0.5 * d["baseline"]["size_bytes"]
    assert d["pruned"]["nonzero_params"] < d["baseline"]["nonzero_params"]
    assert d["accuracy"]["low_margin"]["count"] == pytest.approx(40, abs=2)  # the lowest decile of 400
    assert sum(r["count"] for r in d["accuracy"]["per_class"]) == 400
    assert [r["batch_size"] for r in d["latency"]["by_batch"]] == [1, 8]
    assert all(r["baseline_ms_p50"] > 0 and r["pruned_ms_p99"] >= r["pruned_ms_p50"] for r in d["latency"]["by_batch"])
    assert d["environment"]["seed"] == 7 and d["environment"]["torch"] == torch.__version__
    assert d["baseline"]["peak_activation_bytes_batch32"] >= 32 * 64 * 4  # the hidden activation at least


def test_verdict_explains_no_speedup_from_unstructured(models_and_data) -> None:
    baseline, pruned, data = models_and_data
    d = compare(baseline, pruned, data, batch_sizes=(1,), repeats=3, warmup=1).data
    assert any(v.startswith("smaller on disk: yes") for v in d["verdicts"])
    batch1 = next(v for v in d["verdicts"] if v.startswith("faster at batch 1"))
    assert "yes" in batch1 or "sparse runtime" in batch1


def test_identical_models_agree_everywhere(models_and_data) -> None:
    baseline, _, data = models_and_data
    d = compare(baseline, copy.deepcopy(baseline), data, batch_sizes=(1,), repeats=2, warmup=0).data
    assert d["accuracy"]["agreement"] == 1.0 and d["accuracy"]["low_margin"]["agreement"] == 1.0
    assert d["accuracy"]["dropped_most"] == []


def test_write_report_files(models_and_data, tmp_path) -> None:
    baseline, pruned, data = models_and_data
    curve = [{"sparsity": 0.5, "accuracy": 0.9}, {"sparsity": 0.8, "accuracy": 0.85}]
    report = compare(baseline, pruned, data, batch_sizes=(1, 4), repeats=2, warmup=0, curve=curve)
    write_report(report, tmp_path)
    assert json.loads((tmp_path / "report.json").read_text())["report_version"] == 1
    html = (tmp_path / "report.html").read_text()
    assert html.count("data:image/png;base64,") == 4 and "<table>" in html and "src=\"http" not in html
    assert "## Latency" in (tmp_path / "report.md").read_text()
    assert (tmp_path / "latency.png").stat().st_size > 1000


def test_empty_data_is_a_clear_error(models_and_data) -> None:
    baseline, pruned, _ = models_and_data
    with pytest.raises(pk.PrunekitError, match="no batches"):
        compare(baseline, pruned, [], batch_sizes=(1,))


def test_report_states_how_stable_its_latency_ratios_are(models_and_data) -> None:
    baseline, pruned, data = models_and_data
    d = compare(baseline, pruned, data, batch_sizes=(1,), repeats=8, warmup=1).data
    first, second = d["latency"]["by_batch"][0]["speedup_halves"]
    assert d["latency"]["halves_spread"] == pytest.approx(abs(second / first - 1))
    assert any(v.startswith("latency ratios stable within 10 %: ") for v in d["verdicts"])
    short = compare(baseline, pruned, data, batch_sizes=(1,), repeats=4, warmup=0).data  # too few to split
    assert short["latency"]["halves_spread"] is None
    assert not any(v.startswith("latency ratios stable") for v in short["verdicts"])


def test_report_records_the_allocator_it_timed_with(models_and_data) -> None:
    from prunekit.measure import heap as allocator

    baseline, pruned, data = models_and_data
    kept = compare(baseline, pruned, data, batch_sizes=(1,), repeats=2, warmup=0).data["latency"]
    system = compare(baseline, pruned, data, batch_sizes=(1,), repeats=2, warmup=0, retain_memory=False).data["latency"]
    assert kept["allocator"] in (allocator.RETAINED, allocator.UNCHANGED)
    assert system["allocator"] == allocator.SYSTEM_ALLOCATOR
    assert all(len(r["page_faults_per_call"]) == 2 for r in kept["by_batch"] + system["by_batch"])
