"""bench.py: parameter and FLOP counts are exact on known layers; latency is measured and sane."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import prunekit
from prunekit.measure.bench import Comparison, Latency, compare_speed, count_flops, count_params, measure_latency


def test_count_params_counts_shared_once_and_nonzero() -> None:
    lin = nn.Linear(4, 3)
    model = nn.Sequential(lin, nn.ReLU(), lin)
    assert count_params(model) == 15
    with torch.no_grad():
        lin.weight[0].zero_()
    assert count_params(model, nonzero=True) == 11


def test_count_flops_linear_and_conv() -> None:
    assert count_flops(nn.Linear(8, 4, bias=False), torch.randn(2, 8)) == 2 * 2 * 8 * 4
    conv = nn.Conv2d(3, 5, 3, padding=1, bias=False)
    assert count_flops(conv, torch.randn(1, 3, 6, 6)) == 2 * 5 * 6 * 6 * 3 * 9


def test_measure_latency_interleaved_and_restores_mode() -> None:
    a, b = nn.Linear(64, 64).train(), nn.Linear(64, 8)
    threads = torch.get_num_threads()
    res = measure_latency({"a": a, "b": b}, torch.randn(4, 64), repeats=7, warmup=1, threads=1)
    assert set(res) == {"a", "b"} and all(r.repeats == 7 for r in res.values())
    assert all(0 < r.latency_ms_p50 <= r.latency_ms_p99 for r in res.values())
    assert a.training and torch.get_num_threads() == threads


def test_measure_latency_rejects_bad_arguments() -> None:
    with pytest.raises(prunekit.ConfigError, match="repeats"):
        measure_latency({"a": nn.Linear(2, 2)}, torch.randn(1, 2), repeats=0)


def test_compare_reports_ratios_and_says_when_not_faster() -> None:
    c = compare_speed(nn.Linear(32, 32), nn.Linear(32, 16), torch.randn(1, 32), repeats=5, warmup=1)
    assert c.params_ratio == pytest.approx((32 * 16 + 16) / (32 * 32 + 32))
    assert c.flops_ratio == pytest.approx(0.5)
    slow = Comparison((10, 5), (10, 5), (Latency(1.0, 1.0, 3), Latency(1.2, 1.3, 3)), 1)
    assert "did NOT improve" in slow.summary()


def test_measure_latency_alternates_the_call_order_and_keeps_every_time() -> None:
    calls: list[str] = []

    class Tagged(nn.Module):
        def __init__(self, tag: str) -> None:
            super().__init__()
            self.tag = tag

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            calls.append(self.tag)
            return x

    res = measure_latency({"a": Tagged("a"), "b": Tagged("b")}, torch.zeros(1), repeats=4, warmup=0)
    assert calls == ["a", "b", "b", "a", "a", "b", "b", "a"]  # neither always runs second
    assert len(res["a"].times_ms) == 4 and res["a"].latency_ms_p50 == pytest.approx(
        sorted(res["a"].times_ms)[1:3][0] / 2 + sorted(res["a"].times_ms)[1:3][1] / 2)
