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
