"""The demo runs end to end on real MNIST (quick mode) and writes what it promises."""

from __future__ import annotations

import json

import pytest

import prunekit as pk
from prunekit.recipes.demo import DemoSettings, run_demo
from prunekit.zoo.models import lenet_300_100


def test_mnist_is_the_real_dataset() -> None:
    from prunekit.zoo.data import load_mnist

    train, test = load_mnist("train"), load_mnist("test")
    assert len(train) == 60_000 and len(test) == 10_000
    images, labels = train.tensors
    assert images.shape == (60_000, 1, 28, 28) and 0.0 <= float(images.min()) and float(images.max()) == 1.0
    assert labels.bincount().tolist()[:2] == [5923, 6742]  # the canonical class counts


def test_quick_demo_writes_report_plot_and_models(tmp_path) -> None:
    settings = DemoSettings(sparsity=0.9, epochs=1, finetune_epochs=2, quick=True, latency_repeats=5)
    report = run_demo(tmp_path, settings, progress=False)
    on_disk = json.loads((tmp_path / "report.json").read_text())
    assert on_disk["pruned"]["sparsity"] == pytest.approx(0.9, abs=1e-3)
    for key in ("accuracy", "size_bytes"):
        assert key in on_disk["baseline"] and key in on_disk["pruned"]
    assert on_disk["baseline"]["size_bytes"] == (tmp_path / "dense.safetensors").stat().st_size
    assert on_disk["pruned"]["size_bytes"] == (tmp_path / "pruned.safetensors").stat().st_size
    assert on_disk["pruned"]["size_bytes"] < 0.15 * on_disk["baseline"]["size_bytes"]
    assert report["baseline"]["accuracy"] > 0.8  # one quick epoch on 6k images still learns
    assert (tmp_path / "accuracy_vs_sparsity.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "fits the 1 MB budget: yes" in (tmp_path / "report.md").read_text()
    assert (tmp_path / "report.html").read_text().count("data:image/png;base64,") == 4
    assert [r["batch_size"] for r in on_disk["latency"]["by_batch"]] == [1, 4, 8, 32]
    assert on_disk["pruned_int8"]["size_bytes"] == (tmp_path / "pruned_int8.safetensors").stat().st_size
    assert on_disk["pruned_int8"]["size_bytes"] < 0.6 * on_disk["pruned"]["size_bytes"]
    model = pk.load(tmp_path / "pruned.safetensors", lenet_300_100())
    assert pk.sparsity(model).total == pytest.approx(on_disk["pruned"]["sparsity"])
