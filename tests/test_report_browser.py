"""report.html renders in a real browser: plots visible, no console errors (headless Chromium)."""

from __future__ import annotations

import copy
import shutil
import subprocess

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import prunekit as pk
from prunekit.measure.report import compare, write_report

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(
    CHROMIUM is None, reason="Debian's chromium is not installed (scripts/test installs it)"
)
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--hide-scrollbars"]


def test_report_html_renders_plots_without_console_errors(tmp_path) -> None:
    import matplotlib.image

    torch.manual_seed(0)
    x, y = torch.randn(200, 10), torch.randint(0, 3, (200,))
    data = DataLoader(TensorDataset(x, y), batch_size=50)
    baseline = nn.Sequential(nn.Linear(10, 32), nn.ReLU(), nn.Linear(32, 3))
    pruned = pk.finalize(pk.prune(copy.deepcopy(baseline), pk.UnstructuredConfig(sparsity=0.7)))
    curve = [{"sparsity": 0.0, "accuracy": 0.4}, {"sparsity": 0.7, "accuracy": 0.38}]
    write_report(compare(baseline, pruned, data, batch_sizes=(1, 8), repeats=2, warmup=0, curve=curve), tmp_path)

    shot = tmp_path / "shot.png"
    run = subprocess.run(
        [CHROMIUM, *FLAGS, f"--user-data-dir={tmp_path / 'profile'}", "--enable-logging=stderr", "--v=0",
         "--window-size=1000,4200", f"--screenshot={shot}", (tmp_path / "report.html").as_uri()],
        capture_output=True, text=True, timeout=120,
    )
    assert shot.exists(), run.stderr[-2000:]
    console = [line for line in run.stderr.splitlines() if "CONSOLE" in line or "Uncaught" in line]
    assert console == [], console
    pixels = matplotlib.image.imread(shot)[..., :3]
    # matplotlib's tab:blue (31, 119, 180) and tab:orange (255, 127, 14) only appear if the plots were drawn.
    for rgb in ((31, 119, 180), (255, 127, 14)):
        close = np.abs(pixels * 255 - np.array(rgb)).max(axis=-1) < 12
        assert close.sum() > 200, f"colour {rgb} missing: plots did not render"


PROBE = """<script>
const h2 = [...document.querySelectorAll('h2')].find(h => h.textContent === 'Accuracy by segment');
const table = h2 && h2.nextElementSibling;
const box = table ? table.getBoundingClientRect() : null;
const rows = table ? [...table.rows].map(r => [...r.cells].map(c => c.textContent)) : [];
const probe = document.createElement('pre');
probe.id = 'probe';
probe.textContent = JSON.stringify({tag: table && table.tagName, width: box && box.width, height: box && box.height,
  visible: table ? getComputedStyle(table).display !== 'none' : false, rows: rows});
document.body.appendChild(probe);
</script>"""


def test_segment_table_renders_for_mnist_by_stroke_thickness(tmp_path) -> None:
    """Real MNIST, segmented by a function of each image (ink pixels, terciles): the HTML's
    per-segment table is laid out by the browser with one row per segment."""
    import json
    import re

    from prunekit.measure.cost import CostQuery
    from prunekit.zoo.data import load_mnist

    try:
        images, labels = load_mnist("test").tensors
    except pk.PrunekitError as err:
        pytest.skip(f"MNIST is not installed: {err}")
    train = DataLoader(TensorDataset(images[:2000], labels[:2000]), batch_size=64, shuffle=True,
                       generator=torch.Generator().manual_seed(0))
    evaluate = TensorDataset(images[5000:5300], labels[5000:5300])  # 300 held-out images
    torch.manual_seed(0)
    baseline = nn.Sequential(nn.Flatten(), nn.Linear(784, 32), nn.ReLU(), nn.Linear(32, 10))
    pk.finetune(baseline, train, epochs=1, lr=1e-2, progress=False)
    pruned = pk.finalize(pk.prune(copy.deepcopy(baseline), pk.UnstructuredConfig(sparsity=0.9, scope="layer")))
    ink = (evaluate.tensors[0] > 0.5).flatten(1).sum(1).float()
    cuts = torch.quantile(ink, torch.tensor([1 / 3, 2 / 3])).tolist()

    def thickness(x: torch.Tensor) -> str:
        n = int((x > 0.5).sum())
        return "thin" if n < cuts[0] else "medium" if n < cuts[1] else "thick"

    report = compare(baseline, pruned, DataLoader(evaluate, batch_size=100), batch_sizes=(1, 8), repeats=3,
                     warmup=0, segments=thickness, cost=CostQuery(qps=1000, serving_batch=8, price_per_host_hour=1))
    write_report(report, tmp_path)
    html = (tmp_path / "report.html").read_text()
    (tmp_path / "probe.html").write_text(html.replace("</body>", PROBE + "</body>"))
    run = subprocess.run(
        [CHROMIUM, *FLAGS, f"--user-data-dir={tmp_path / 'profile'}", "--enable-logging=stderr", "--v=0",
         "--window-size=1000,3000", "--dump-dom", (tmp_path / "probe.html").as_uri()],
        capture_output=True, text=True, timeout=120,
    )
    found = re.search(r'<pre id="probe">(.*?)</pre>', run.stdout, re.S)
    assert found, run.stderr[-2000:]
    probe = json.loads(found.group(1).replace("&quot;", '"').replace("&amp;", "&"))
    assert probe["tag"] == "TABLE" and probe["visible"] and probe["width"] > 300 and probe["height"] > 40
    header, *rows = probe["rows"]
    assert header[:3] == ["segment", "count", "baseline"]
    expected = {r["segment"]: r for r in report.data["accuracy"]["segments"]["rows"]}
    assert sorted(r[0] for r in rows) == sorted(expected) == ["medium", "thick", "thin"]
    for name, count, base, pruned_acc, *_ in rows:
        assert int(count) == expected[name]["count"] and sum(r["count"] for r in expected.values()) == 300
        assert base == f"{100 * expected[name]['baseline']:.2f}%"
        assert pruned_acc == f"{100 * expected[name]['pruned']:.2f}%"
    console = [line for line in run.stderr.splitlines() if "CONSOLE" in line or "Uncaught" in line]
    assert console == [], console
    assert "<h2>Serving cost</h2>" in run.stdout and "hosts p99" in run.stdout
