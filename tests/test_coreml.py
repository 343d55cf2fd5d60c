"""Core ML export: pruned weights stay sparse in the .mlpackage, the check reads them back by name."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import prunekit as pk
from prunekit.core.masks import masked_modules
from prunekit.deploy import coreml
from prunekit.deploy.coreml import check_coreml, export_coreml, folder_size
from prunekit.errors import ConfigError, ExportCheckError, PrunekitError, TraceError
from tests.models import ResidualCNN


@pytest.fixture(scope="module")
def ct():
    return pytest.importorskip("coremltools")


def _mlp() -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(256, 128), nn.ReLU(), nn.Linear(128, 64), nn.ReLU(),
                          nn.Linear(64, 10)).eval()
    return pk.prune(model, pk.UnstructuredConfig(sparsity=0.9, scope="layer")), torch.randn(1, 256)


def _cnn() -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    model = ResidualCNN(width=48).eval()
    for module in model.modules():  # non-trivial BatchNorm, so the converter's folding shows
        if isinstance(module, nn.BatchNorm2d):
            module.running_var.uniform_(0.5, 2.0)
    return pk.prune(model, pk.UnstructuredConfig(sparsity=0.9, scope="layer")), torch.randn(1, 1, 12, 12)


@pytest.mark.parametrize("build", [_mlp, _cnn], ids=["mlp", "cnn"])
def test_sparse_package_is_checked_and_small(ct, build, tmp_path: Path) -> None:
    model, x = build()
    fp32 = export_coreml(model, tmp_path / "m.mlpackage", x)
    names = {f"{fqn}.weight" for fqn in masked_modules(model)}
    assert {t.name for t in fp32.tensors} == names
    for t in fp32.tensors:
        weight = model.get_submodule(t.name.removesuffix(".weight")).weight
        assert t.nonzeros == int((weight != 0).sum()) and t.shape == tuple(weight.shape)
    assert fp32.size_bytes == folder_size(fp32.path)
    assert fp32.dense_size_bytes is not None and fp32.size_bytes <= 0.3 * fp32.dense_size_bytes
    fp16 = export_coreml(model, tmp_path / "h.mlpackage", x, precision="fp16", compare_dense=False)
    assert len(fp16.tensors) == len(names) and fp16.size_bytes < fp32.size_bytes
    assert check_coreml(model, fp16.path) == fp16.tensors


def test_folded_batchnorm_weights_are_found_by_zero_pattern(ct, tmp_path: Path) -> None:
    model, x = _cnn()
    report = export_coreml(model, tmp_path / "c.mlpackage", x, compare_dense=False)
    convs = {t.name: t for t in report.tensors if t.name.startswith("conv")}
    assert set(convs) == {"conv1.weight", "conv2.weight"}
    assert all(t.values == "scaled" for t in convs.values())
    int8 = export_coreml(model, tmp_path / "q.mlpackage", x, quantize="int8", compare_dense=False)
    assert [(t.name, t.values, t.storage) for t in int8.tensors if t.name.startswith("conv")] == [
        ("conv1.weight", "scaled", "sparse+int8"), ("conv2.weight", "scaled", "sparse+int8")]


def test_dense_package_fails_the_check_naming_the_weight(ct, tmp_path: Path) -> None:
    model, x = _mlp()
    report = export_coreml(model, tmp_path / "d.mlpackage", x, sparse=False, compare_dense=False)
    assert report.tensors == ()
    with pytest.raises(ExportCheckError, match=r"weight '1\.weight' .*not stored sparse"):
        check_coreml(model, report.path)


def test_a_lost_zero_is_caught_naming_the_weight(ct, tmp_path: Path) -> None:
    model, x = _mlp()
    report = export_coreml(model, tmp_path / "z.mlpackage", x, compare_dense=False)
    model = pk.finalize(model)
    with torch.no_grad():  # the model now has one zero fewer than the package
        weight = model[3].weight
        index = (weight == 0).nonzero()[0]
        weight[tuple(index)] = 0.5
    with pytest.raises(ExportCheckError, match=r"weight '3\.weight'.*non-zeros"):
        check_coreml(model, report.path)


def test_changed_values_are_caught_naming_the_weight(ct, tmp_path: Path) -> None:
    model, x = _mlp()
    report = export_coreml(model, tmp_path / "v.mlpackage", x, compare_dense=False)
    model = pk.finalize(model)
    with torch.no_grad():
        model[5].weight[0] *= 2  # zeros kept, values not
    with pytest.raises(ExportCheckError, match=r"weight '5\.weight'.*values differ"):
        check_coreml(model, report.path)


def test_failed_export_leaves_the_previous_package(ct, tmp_path: Path, monkeypatch) -> None:
    model, x = _mlp()
    path = tmp_path / "p.mlpackage"
    first = export_coreml(model, path, x, compare_dense=False)
    before = folder_size(path)

    def broken(*args, **kwargs):
        raise ExportCheckError("weight 'x': broken on purpose")

    monkeypatch.setattr(coreml, "check_coreml", broken)
    with pytest.raises(ExportCheckError, match="on purpose"):
        export_coreml(model, path, x, precision="fp16", compare_dense=False)
    assert folder_size(path) == before == first.size_bytes
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.mlpackage"]  # no staging folder left


def test_bad_options_are_refused(ct, tmp_path: Path) -> None:
    model, x = _mlp()
    with pytest.raises(ConfigError, match="precision"):
        export_coreml(model, tmp_path / "b.mlpackage", x, precision="int4")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="target"):
        export_coreml(model, tmp_path / "b.mlpackage", x, target="iOS12")  # type: ignore[arg-type]


def test_missing_coremltools_names_the_extra(monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "coremltools", None)  # makes `import coremltools` fail
    with pytest.raises(PrunekitError, match=r"pip install 'prunekit\[coreml\]'"):
        coreml.require_coremltools()


@pytest.mark.parametrize("quantize", ["int8", "lut4"])
def test_sparse_plus_quantized_weights_are_checked_within_tolerance(ct, quantize, tmp_path: Path) -> None:
    model, x = _mlp()
    float16 = export_coreml(model, tmp_path / "f.mlpackage", x, precision="fp16", compare_dense=False)
    report = export_coreml(model, tmp_path / "q.mlpackage", x, precision="fp16", quantize=quantize,
                           compare_dense=False)
    assert {t.storage for t in report.tensors} == {f"sparse+{quantize}"}
    assert [t.nonzeros for t in report.tensors] == [t.nonzeros for t in float16.tensors]
    assert all(t.values == "quantized" and 0 < t.max_error < 0.05 for t in report.tensors)
    assert report.size_bytes < float16.size_bytes
    model = pk.finalize(model)
    with torch.no_grad():
        model[5].weight[0] *= 1.5  # zeros kept, values moved beyond a quantization step
    with pytest.raises(ExportCheckError, match=r"weight '5\.weight'.*beyond the quantization tolerance"):
        check_coreml(model, report.path)


def test_quantize_needs_ios18(ct, tmp_path: Path) -> None:
    model, x = _mlp()
    with pytest.raises(ConfigError, match=r"quantize='int8' needs target='iOS18'"):
        export_coreml(model, tmp_path / "o.mlpackage", x, quantize="int8", target="iOS17")


class _Special(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.digamma(self.proj(x))  # coremltools 9 has no converter for aten.digamma


def test_unsupported_op_is_named_with_its_layer(ct, tmp_path: Path) -> None:
    model = nn.Sequential(nn.Linear(8, 8), nn.Sequential(nn.ReLU(), _Special())).eval()
    with pytest.raises(TraceError, match=r"op 'digamma' \(aten\.digamma\.default\) in layer '1\.1' \(_Special\)"):
        export_coreml(model, tmp_path / "u.mlpackage", torch.randn(2, 8), compare_dense=False)
    assert list(tmp_path.iterdir()) == []
