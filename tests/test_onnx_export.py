"""ONNX export: round trips keep shapes, zeros and outputs; broken files fail naming the tensor."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import prunekit as pk
from prunekit.errors import ConfigError, ExportCheckError, PrunekitError, TraceError
from tests.models import ZOO

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from onnx import numpy_helper  # noqa: E402

from prunekit.deploy.onnx_check import check_onnx  # noqa: E402
from prunekit.deploy.onnx_export import export_onnx, onnx_bytes  # noqa: E402


def _pruned(name: str, sparsity: float = 0.7) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    ctor, example = ZOO[name]
    model = ctor()
    for module in model.modules():  # non-trivial BatchNorm statistics, so folding shows
        if isinstance(module, nn.BatchNorm2d):
            module.running_var.uniform_(0.5, 2.0)
            module.weight.data.uniform_(0.5, 2.0)
    model.eval()
    return pk.prune(model, pk.UnstructuredConfig(sparsity=sparsity)), example()


def _two_four(model: nn.Module) -> nn.Module:
    """Keep the 2 largest of every 4 consecutive inputs in each Linear (a test-local 2:4 mask)."""
    for module in model.modules():
        if isinstance(module, nn.Linear) and module.in_features % 4 == 0:
            w = module.weight.detach().abs().reshape(module.out_features, -1, 4)
            keep = torch.zeros_like(w, dtype=torch.bool).scatter_(-1, w.topk(2, dim=-1).indices, True)
            pk.core.masks.set_mask(module, keep.reshape_as(module.weight))
    return model


def _edit(blob: bytes, name: str, change) -> bytes:
    """Return `blob` with initializer `name` replaced by `change(array)`."""
    proto = onnx.load_from_string(blob)
    for init in proto.graph.initializer:
        if init.name == name:
            init.CopyFrom(numpy_helper.from_array(change(numpy_helper.to_array(init).copy()), name))
            return proto.SerializeToString()
    raise AssertionError(f"no initializer {name!r}")


def _initializer_for(report: pk.ExportReport, tensor: str) -> str:
    return next(t.onnx_name for t in report.tensors if t.name == tensor)


@pytest.mark.parametrize("name", ["mlp", "residual_cnn", "attention"])
def test_round_trip_keeps_shapes_zeros_and_outputs(name: str, tmp_path: Path) -> None:
    model, example = _pruned(name)
    path = tmp_path / f"{name}.onnx"
    report = export_onnx(model, path, example)
    assert report.checked and path.stat().st_size == report.size_bytes
    assert 0 < report.zip_bytes < report.size_bytes and 0 < report.lzma_bytes < report.size_bytes
    layers = pk.sparsity(model).layers
    expected = {f"{fqn}.weight" for fqn in layers}
    assert expected <= {t.name for t in report.tensors}
    for t in report.tensors:
        assert t.onnx_sparsity == pytest.approx(layers[t.name.removesuffix(".weight")])
    assert report.max_abs_diff is not None and report.max_abs_diff < 1e-4
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temporary file left
    if name == "attention":  # 3-D input: the exporter pre-transposes Linear weights for MatMul
        assert {t.name: t.layout for t in report.tensors}["fc1.weight"] == "transposed"
    if name == "residual_cnn":  # BatchNorm folded into the conv weights: matched up to a scale
        assert {t.name: t.values for t in report.tensors}["conv1.weight"] == "scaled"


def test_dynamic_batch_checks_real_batches(tmp_path: Path) -> None:
    model, _ = _pruned("mlp")
    data = [(torch.randn(5, 1, 8, 8), torch.zeros(5)) for _ in range(4)]
    report = export_onnx(model, tmp_path / "m.onnx", torch.randn(1, 1, 8, 8), data=data, max_batches=2)
    assert report.batches_checked == 3


# --------------------------------------------------------------------------------------------
# Broken files.


@pytest.fixture(scope="module")
def exported_mlp() -> tuple[nn.Module, torch.Tensor, bytes]:
    model, example = _pruned("mlp", sparsity=0.8)
    return model, example, onnx_bytes(model, (example,), dynamic_batch=True, opset=20)


def _name_of(model: nn.Module, blob: bytes, example: torch.Tensor, tensor: str) -> str:
    result = check_onnx(model, blob, example)
    return next(t.onnx_name for t in result.tensors if t.name == tensor)


def test_densified_zeros_fail_naming_the_tensor(exported_mlp) -> None:
    model, example, blob = exported_mlp
    name = _name_of(model, blob, example, "3.weight")
    dense = _edit(blob, name, lambda a: np.where(a == 0, np.float32(1e-3), a))
    with pytest.raises(ExportCheckError, match=r"'3\.weight'.*sparsity dropped"):
        check_onnx(model, dense, example)


def test_perturbed_weight_fails_naming_the_tensor(exported_mlp) -> None:
    model, example, blob = exported_mlp

    def perturb(a: np.ndarray) -> np.ndarray:
        i = np.flatnonzero(a)[0]
        a.flat[i] += 0.5
        return a

    name = _name_of(model, blob, example, "1.weight")
    with pytest.raises(ExportCheckError, match=r"'1\.weight'.*values differ"):
        check_onnx(model, _edit(blob, name, perturb), example)


def test_broken_two_four_group_fails_naming_the_tensor() -> None:
    torch.manual_seed(0)
    model = _two_four(ZOO["mlp"][0]()).eval()
    example = torch.randn(2, 1, 8, 8)
    blob = onnx_bytes(model, (example,), dynamic_batch=True, opset=20)
    result = check_onnx(model, blob, example, n=2, m=4)
    assert {t.nm for t in result.tensors if t.name in ("1.weight", "3.weight")} == {(2, 4)}
    name = next(t.onnx_name for t in result.tensors if t.name == "3.weight")

    def fill_group(a: np.ndarray) -> np.ndarray:
        row = a[0] if a.shape[0] == 16 else a[:, 0]  # PyTorch (out, in) or transposed
        row[:4] = np.where(row[:4] == 0, np.float32(0.25), row[:4])
        return a

    with pytest.raises(ExportCheckError, match=r"'3\.weight'.*2:4 group is broken"):
        check_onnx(model, _edit(blob, name, fill_group), example)  # pattern detected
    with pytest.raises(ExportCheckError, match=r"'3\.weight'.*2:4"):
        check_onnx(model, _edit(blob, name, fill_group), example, n=2, m=4)


def test_failed_check_leaves_no_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, exported_mlp) -> None:
    model, example, blob = exported_mlp
    name = _name_of(model, blob, example, "1.weight")
    broken = _edit(blob, name, lambda a: np.where(a == 0, np.float32(1e-3), a))
    monkeypatch.setattr("prunekit.deploy.onnx_export.onnx_bytes", lambda *a, **k: broken)
    path = tmp_path / "out.onnx"
    path.write_bytes(b"previous")
    with pytest.raises(ExportCheckError, match=r"'1\.weight'"):
        export_onnx(model, path, example)
    assert path.read_bytes() == b"previous"  # the old file survives, untouched
    assert [p.name for p in tmp_path.iterdir()] == ["out.onnx"]


# --------------------------------------------------------------------------------------------
# Bad input.


class _DataDependent(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:  # data-dependent Python control flow: torch.export cannot trace it
            return self.fc(x)
        return x


def test_untraceable_model_raises_trace_error(tmp_path: Path) -> None:
    with pytest.raises(TraceError, match="_DataDependent"):
        export_onnx(_DataDependent(), tmp_path / "x.onnx", torch.ones(2, 4))
    assert list(tmp_path.iterdir()) == []


def test_unsupported_opset_is_a_config_error(tmp_path: Path) -> None:
    model, example = _pruned("mlp")
    with pytest.raises(ConfigError, match="opset"):
        export_onnx(model, tmp_path / "x.onnx", example, opset=9)
    with pytest.raises(ConfigError, match="n=2, m=None"):
        export_onnx(model, tmp_path / "x.onnx", example, n=2)
    assert list(tmp_path.iterdir()) == []


def test_unwritable_path_is_a_clear_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    model, example = _pruned("mlp")
    with pytest.raises(PrunekitError, match="cannot write"):
        export_onnx(model, blocker / "model.onnx", example)


# --------------------------------------------------------------------------------------------
# INT8.


def test_dynamic_int8_export_keeps_int8_zeros(tmp_path: Path) -> None:
    from prunekit.deploy.quantize import DynamicInt8Config, quantize

    model, example = _pruned("mlp", sparsity=0.8)
    q = quantize(model, DynamicInt8Config())
    report = export_onnx(q, tmp_path / "q.onnx", example)
    assert report.int8 and len(report.tensors) == 3
    for t in report.tensors:
        assert t.onnx_name.endswith("_quantized")
        assert t.onnx_sparsity == pytest.approx(t.sparsity) and t.sparsity > 0.5
    proto = onnx.load(str(tmp_path / "q.onnx"))
    int8 = [i for i in proto.graph.initializer if i.data_type == onnx.TensorProto.INT8 and len(i.dims) == 2]
    assert len(int8) == 3


def test_import_prunekit_loads_no_onnx() -> None:
    code = "import sys, prunekit; print([m for m in ('onnx', 'onnxruntime') if m in sys.modules])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_cli_export_int8_from_checkpoint(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from prunekit.cli import app
    from prunekit.zoo.models import lenet_300_100

    torch.manual_seed(0)
    ckpt = pk.save(pk.prune(lenet_300_100(), pk.UnstructuredConfig(sparsity=0.9)), tmp_path / "m.safetensors")
    out = tmp_path / "m.onnx"
    result = CliRunner().invoke(app, ["export", str(ckpt.path), "--out", str(out), "--int8"])
    assert result.exit_code == 0, result.output
    assert out.is_file() and "check passed" in result.output and "INT8" in result.output
    bad = CliRunner().invoke(app, ["export", str(ckpt.path), "--out", str(out), "--model", "nope"])
    assert bad.exit_code == 2 and "unknown zoo model 'nope'" in bad.output


class _UnusedHead(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 8)
        self.pooler = nn.Linear(8, 8)  # called, but its output is unused: the exporter drops it

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.pooler(x)
        return self.fc(x)


def test_layers_the_outputs_do_not_use_are_listed_not_failed(tmp_path: Path) -> None:
    model = pk.prune(_UnusedHead(), pk.UnstructuredConfig(sparsity=0.5))
    report = export_onnx(model, tmp_path / "u.onnx", torch.randn(2, 8))
    assert [t.name for t in report.tensors] == ["fc.weight"]
    assert report.unmapped == ("pooler.weight (unused by the outputs)",)
