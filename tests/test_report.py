"""The validation report measures what it claims and renders to JSON, Markdown and HTML."""

from __future__ import annotations

import copy
import json
import statistics

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


class _Repeat(nn.Module):
    """`times` matmuls of one 512x512 layer, then a 4-way head: the work scales with `times`."""

    def __init__(self, layer: nn.Linear, head: nn.Linear, times: int) -> None:
        super().__init__()
        self.layer, self.head, self.times = layer, head, times

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for _ in range(self.times):
            x = torch.tanh(self.layer(x))
        return self.head(x)



def _repeat_pair(slow_times: int):
    torch.manual_seed(0)
    layer, head = nn.Linear(512, 512), nn.Linear(512, 4)
    x = torch.randn(64, 512)
    data = DataLoader(TensorDataset(x, torch.randint(0, 4, (64,))), batch_size=64)
    return _Repeat(layer, head, 1), _Repeat(copy.deepcopy(layer), copy.deepcopy(head), slow_times), data


def test_a_truly_slower_model_is_called_slower_and_its_baseline_faster(one_thread) -> None:
    fast, slow, data = _repeat_pair(3)
    for baseline, pruned, word in ((fast, slow, "no, slower"), (slow, fast, "yes")):
        d = compare(baseline, pruned, data, batch_sizes=(32,), repeats=16, warmup=2).data
        row = d["latency"]["by_batch"][0]
        lo, hi = row["speedup_ci95"]
        assert lo <= row["speedup"] <= hi
        assert row["speed_call"] == ("slower" if word == "no, slower" else "faster")
        line = next(v for v in d["verdicts"] if v.startswith("faster at batch 32"))
        assert line.startswith(f"faster at batch 32: {word} (") and "95 % CI" in line


def test_identical_models_are_never_called_faster(one_thread) -> None:
    same, _, data = _repeat_pair(1)
    twin = copy.deepcopy(same)
    for _ in range(3):
        d = compare(same, twin, data, batch_sizes=(1, 32), repeats=12, warmup=2).data
        calls = [r["speed_call"] for r in d["latency"]["by_batch"]]
        assert "faster" not in calls and "slower" not in calls, d["verdicts"]
        lines = [v for v in d["verdicts"] if v.startswith("faster at batch")]
        assert all(": no measurable difference (" in v and " %" in v for v in lines), lines


def test_too_few_timed_calls_make_no_speed_claim(models_and_data) -> None:
    baseline, pruned, data = models_and_data
    d = compare(baseline, pruned, data, batch_sizes=(1,), repeats=3, warmup=0).data
    assert d["latency"]["by_batch"][0]["speedup_ci95"] is None
    assert d["latency"]["by_batch"][0]["speed_call"] == "undetermined"
    assert any(v.startswith("faster at batch 1: undetermined (") for v in d["verdicts"])


def test_speed_call_widens_to_the_halves_of_the_run() -> None:
    from prunekit.measure.noise import speed_call

    assert speed_call([1.2, 1.4], [1.25, 1.3]) == "faster"
    assert speed_call([1.2, 1.4], [1.25, 0.97]) == "no measurable difference"  # load drifted in the run
    assert speed_call([0.5, 0.7]) == "slower" and speed_call(None) == "undetermined"
    assert speed_call([1.2, 1.4], [1.25, 1.3], spread=0.25) == "no measurable difference"  # a busy run
    assert speed_call([0.3, 0.35], spread=0.25) == "slower"


def test_bootstrap_interval_is_deterministic_and_covers_the_ratio() -> None:
    from prunekit.measure.noise import speedup_interval

    gen = torch.Generator().manual_seed(3)
    base = (2.0 + 0.1 * torch.rand(40, generator=gen)).tolist()
    pruned = (1.0 + 0.05 * torch.rand(40, generator=gen)).tolist()
    a, b = speedup_interval(base, pruned), speedup_interval(base, pruned)
    assert a == b and a is not None
    ratio = statistics.median(base) / statistics.median(pruned)
    assert 1.8 < a[0] < ratio < a[1] < 2.2 and a[1] - a[0] < 0.15


def test_wilson_interval_matches_a_hand_computation() -> None:
    from prunekit.measure.noise import wilson_interval

    # p = 0.9, n = 100, z = 1.96: centre (0.9 + z^2/200) / (1 + z^2/100) = 0.885207,
    # half-width z / (1 + z^2/100) * sqrt(0.9 * 0.1 / 100 + z^2 / 40000) = 0.059569.
    lo, hi = wilson_interval(90, 100)
    assert lo == pytest.approx(0.885207 - 0.059569, abs=1e-5) and hi == pytest.approx(0.885207 + 0.059569, abs=1e-5)
    assert wilson_interval(0, 10)[0] == 0.0 and wilson_interval(10, 10)[1] == pytest.approx(1.0)


def test_accuracy_verdict_states_its_binomial_noise(models_and_data) -> None:
    from prunekit.measure.noise import paired_change, wilson_interval

    baseline, pruned, data = models_and_data
    d = compare(baseline, pruned, data, batch_sizes=(1,), repeats=2, warmup=0).data
    ci = d["accuracy"]["top1_ci95"]
    assert ci["baseline"] == pytest.approx(wilson_interval(round(400 * d["baseline"]["accuracy"]), 400))
    change = d["accuracy"]["top1_change"]
    assert change["points"] == pytest.approx(100 * (d["pruned"]["accuracy"] - d["baseline"]["accuracy"]))
    line = d["verdicts"][0]
    assert line.startswith("accuracy within 1 point: ") and "at 95 % on 400 examples" in line
    assert ("beyond that noise" in line) == change["beyond_noise"]
    # 30 losses and no gains out of 1000 is beyond noise; 2 losses and 1 gain is not.
    lost = paired_change(torch.ones(1000, dtype=torch.bool), torch.arange(1000) >= 30)
    assert lost["points"] == pytest.approx(-3.0) and lost["beyond_noise"] and lost["ci95_points"][1] < 0
    assert lost["ci95_points"][0] < -3.0 < lost["ci95_points"][1]
    few = paired_change(torch.arange(1000) >= 1, (torch.arange(1000) >= 3) | (torch.arange(1000) == 0))
    assert few["gained"] == 1 and few["lost"] == 2 and not few["beyond_noise"]
    assert few["ci95_points"][0] < few["points"] < few["ci95_points"][1]
    # By hand for 5 and 6 lost of 10,000 (none gained): half-width 1.96 * sqrt((m/n - d^2) / n) + 1/n,
    # 0.0538 and 0.0580 points; 5 stays within noise, 6 is beyond (as the exact McNemar test says).
    five = paired_change(torch.ones(10_000, dtype=torch.bool), torch.arange(10_000) >= 5)
    six = paired_change(torch.ones(10_000, dtype=torch.bool), torch.arange(10_000) >= 6)
    assert five["ci95_points"][1] == pytest.approx(-0.05 + 0.05383, abs=1e-4) and not five["beyond_noise"]
    assert six["ci95_points"][1] == pytest.approx(-0.06 + 0.05801, abs=1e-4) and six["beyond_noise"]
