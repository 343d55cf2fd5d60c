"""ExecuTorch export: dense and channel-pruned conv nets lower to XNNPACK, run, match PyTorch."""

from __future__ import annotations

import builtins
import copy

import pytest
import torch
from torch import nn

pytest.importorskip("executorch")

import prunekit  # noqa: E402
from prunekit.deploy import executorch as pk_et  # noqa: E402
from prunekit.deploy.executorch import export_executorch, load_pte, time_pte  # noqa: E402
from prunekit.errors import ConfigError, ExportCheckError, PrunekitError, TraceError  # noqa: E402


class ConvNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
            nn.Conv2d(32, 64, 3, padding=1, stride=2), nn.BatchNorm2d(64), nn.ReLU(),
            nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(),
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(self.features(x)), 1))


class Sorts(nn.Module):
    """A layer whose op (aten::sort) neither XNNPACK nor ExecuTorch's portable kernels run."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 8)
        self.head = SortHead()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.fc(x))


class SortHead(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sort(x, dim=1).values


class Erfinv(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.erfinv(torch.tanh(self.fc(x)) * 0.5)


@pytest.fixture(scope="module")
def nets() -> tuple[nn.Module, nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    dense = ConvNet().eval()
    x = torch.randn(1, 3, 16, 16)
    pruned = copy.deepcopy(dense)
    prunekit.plan(pruned, prunekit.ChannelConfig(ratio=0.5), x).apply(pruned)
    return dense, pruned.eval(), x


def test_dense_and_pruned_export_and_match(nets, tmp_path):
    dense, pruned, x = nets
    assert pruned.fc.in_features < dense.fc.in_features  # the plan really removed channels
    a = export_executorch(dense, tmp_path / "dense.pte", x)
    b = export_executorch(pruned, tmp_path / "pruned.pte", x)
    for report, model in ((a, dense), (b, pruned)):
        assert report.checked and report.max_rel_diff is not None and report.max_rel_diff <= 1e-4
        assert report.path.stat().st_size == report.size_bytes
        assert report.delegated_fraction > 0.5  # convs and the linear run in XNNPACK
        with torch.no_grad():
            torch.testing.assert_close(load_pte(report.path)(x)[0], model(x), rtol=1e-4, atol=1e-5)
    assert b.size_bytes < 0.5 * a.size_bytes  # half the channels: about a quarter of the conv weights
    assert time_pte(b.path, (x,), repeats=3, warmup=1) > 0
    assert "check passed" in b.summary()


def test_masked_model_exports_its_finalized_weights(tmp_path):
    torch.manual_seed(1)
    model = prunekit.prune(ConvNet().eval(), prunekit.UnstructuredConfig(sparsity=0.5))
    x = torch.randn(1, 3, 16, 16)
    report = export_executorch(model, tmp_path / "masked.pte", x)
    assert report.checked and report.max_rel_diff <= 1e-4
    assert prunekit.core.masks.masked_modules(model)  # the caller's model keeps its masks


def test_wrong_reference_raises_and_writes_nothing(nets, tmp_path):
    dense, pruned, x = nets
    target = tmp_path / "wrong.pte"
    with pytest.raises(ExportCheckError, match=r"max \|diff\|"):
        export_executorch(pruned, target, x, reference=dense)
    assert not target.exists() and not list(tmp_path.iterdir())  # no temporary file left either


def test_failed_check_keeps_previous_file(nets, tmp_path):
    dense, pruned, x = nets
    target = tmp_path / "model.pte"
    target.write_bytes(b"previous")
    with pytest.raises(ExportCheckError):
        export_executorch(pruned, target, x, reference=dense)
    assert target.read_bytes() == b"previous"


def test_op_without_kernel_is_named_with_its_layer(tmp_path):
    with pytest.raises(ExportCheckError, match=r"aten::sort.*layer 'head'"):
        export_executorch(Sorts().eval(), tmp_path / "sort.pte", torch.randn(2, 8))
    assert not (tmp_path / "sort.pte").exists()


def test_op_outside_core_aten_is_named():
    with pytest.raises(TraceError, match=r"aten\.erfinv"):
        export_executorch(Erfinv().eval(), "unused.pte", torch.randn(2, 8))


def test_bad_rtol_is_refused(nets, tmp_path):
    dense, _, x = nets
    with pytest.raises(ConfigError, match="rtol"):
        export_executorch(dense, tmp_path / "m.pte", x, rtol=0)


def test_missing_executorch_names_the_extra(monkeypatch, nets, tmp_path):
    real_import = builtins.__import__

    def no_executorch(name, *args, **kwargs):
        if name == "executorch" or name.startswith("executorch."):
            raise ImportError(f"No module named {name!r}")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_executorch)
    dense, _, x = nets
    with pytest.raises(PrunekitError, match=r"pip install 'prunekit\[executorch\]'"):
        export_executorch(dense, tmp_path / "m.pte", x)
    with pytest.raises(PrunekitError, match=r"prunekit\[executorch\]"):
        pk_et.require_executorch()


def test_dynamic_batch_runs_every_batch_up_to_the_bound(nets, tmp_path):
    _, pruned, x = nets
    report = export_executorch(pruned, tmp_path / "dyn.pte", x, max_batch=4)
    assert report.max_batch == 4 and "batch 1..4" in report.summary()
    run = load_pte(report.path)
    for batch in (1, 3):
        xb = torch.randn(batch, *x.shape[1:])
        with torch.no_grad():
            assert torch.allclose(run(xb)[0], pruned(xb), rtol=1e-4, atol=1e-5)
    with pytest.raises(RuntimeError):  # past the bound the runtime refuses to resize its buffers
        run(torch.randn(5, *x.shape[1:]))
    with pytest.raises(ConfigError, match="max_batch"):
        export_executorch(pruned, tmp_path / "bad.pte", torch.cat([x, x]), max_batch=1)
