"""Per-segment accuracy on real MNIST, segmented by stroke thickness (inked pixels, terciles)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import prunekit as pk
from prunekit.measure.report import compare
from prunekit.measure.report_render import render_html, render_markdown
from prunekit.zoo.data import load_mnist

INK = 0.5  # a pixel brighter than this is ink


@pytest.fixture(scope="module")
def mnist_pair():
    images, labels = load_mnist("test").tensors
    train = DataLoader(TensorDataset(images[:3000], labels[:3000]), batch_size=64, shuffle=True)
    evaluate = TensorDataset(images[5000:5600], labels[5000:5600])  # held out from the 3,000 trained on
    torch.manual_seed(0)
    baseline = nn.Sequential(nn.Flatten(), nn.Linear(784, 64), nn.ReLU(), nn.Linear(64, 10))
    pk.finetune(baseline, train, epochs=2, lr=1e-2, progress=False)
    pruned = pk.finalize(pk.prune(copy.deepcopy(baseline), pk.UnstructuredConfig(sparsity=0.95, scope="layer")))
    ink = (evaluate.tensors[0] > INK).flatten(1).sum(1).float()
    cuts = torch.quantile(ink, torch.tensor([1 / 3, 2 / 3])).tolist()

    def thickness(x: torch.Tensor) -> str:
        n = int((x > INK).sum())
        return "thin" if n < cuts[0] else "medium" if n < cuts[1] else "thick"

    return baseline, pruned, DataLoader(evaluate, batch_size=100), thickness


def test_segments_by_stroke_thickness_match_a_hand_count(mnist_pair) -> None:
    baseline, pruned, data, thickness = mnist_pair
    d = compare(baseline, pruned, data, batch_sizes=(1,), repeats=2, warmup=0, segments=thickness).data
    seg = d["accuracy"]["segments"]
    rows = {r["segment"]: r for r in seg["rows"]}
    assert sorted(rows) == ["medium", "thick", "thin"]
    assert sum(r["count"] for r in rows.values()) == 600 and all(170 <= r["count"] <= 230 for r in rows.values())
    images, labels = data.dataset.tensors
    names = [thickness(x) for x in images]
    for name, row in rows.items():
        sel = torch.tensor([n == name for n in names])
        subset = DataLoader(TensorDataset(images[sel], labels[sel]), batch_size=100)
        assert row["baseline"] == pytest.approx(pk.accuracy(baseline, subset))
        assert row["pruned"] == pytest.approx(pk.accuracy(pruned, subset))
        agree = (baseline(images[sel]).argmax(1) == pruned(images[sel]).argmax(1)).float().mean()
        assert row["agreement"] == pytest.approx(float(agree))
        lo, hi = row["change_ci95_points"]
        assert lo <= 100 * row["delta"] <= hi
    dropped = [n for n in sorted(rows, key=lambda n: rows[n]["delta"]) if rows[n]["delta"] < 0]
    assert seg["dropped_most"] == dropped and dropped  # 95 % of each layer gone costs every tercile something
    assert any(v.startswith(f"segments that dropped most: {dropped[0]} (") for v in d["verdicts"])
    markdown = render_markdown(d)
    assert "## Accuracy by segment" in markdown and f"| thick | {rows['thick']['count']} |" in markdown
    html = render_html(d, pngs={})
    assert "<h2>Accuracy by segment</h2>" in html and "<td>thin</td>" in html
    assert len(d["accuracy"]["per_class"]) == 10  # per-class stays, beside the segments


def test_segment_names_aligned_with_the_examples_give_the_same_table(mnist_pair) -> None:
    baseline, pruned, data, thickness = mnist_pair
    names = [thickness(x) for x in data.dataset.tensors[0]]
    by_name = compare(baseline, pruned, data, batch_sizes=(1,), repeats=2, warmup=0, segments=names).data
    by_function = compare(baseline, pruned, data, batch_sizes=(1,), repeats=2, warmup=0, segments=thickness).data
    assert by_name["accuracy"]["segments"] == by_function["accuracy"]["segments"]
    with pytest.raises(pk.ConfigError, match="segments names 599 examples but the evaluation data has 600"):
        compare(baseline, pruned, data, batch_sizes=(1,), repeats=2, warmup=0, segments=names[:-1])
    assert "segments" not in compare(baseline, pruned, data, batch_sizes=(1,), repeats=2, warmup=0).data["accuracy"]


def test_a_segment_function_that_fails_names_the_example(mnist_pair) -> None:
    baseline, pruned, data, thickness = mnist_pair
    seen = []

    def fragile(x: torch.Tensor) -> str:
        seen.append(x)
        if len(seen) == 238:
            raise ValueError("no ink threshold for this image")
        return thickness(x)

    with pytest.raises(pk.ConfigError, match=r"segments function 'fragile' failed on example 237 \(ValueError: no ink"):
        compare(baseline, pruned, data, batch_sizes=(1,), repeats=2, warmup=0, segments=fragile)
