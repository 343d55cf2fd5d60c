"""ONNX sparse initializers: smaller files that onnxruntime loads and the export check still verifies."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import prunekit as pk
from prunekit.errors import ExportCheckError
from tests.models import ZOO

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from onnx import numpy_helper  # noqa: E402

from prunekit.deploy.onnx_check import check_onnx  # noqa: E402
from prunekit.deploy.onnx_export import export_onnx  # noqa: E402


def _mlp(sparsity: float = 0.9) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(256, 128), nn.ReLU(), nn.Linear(128, 64), nn.ReLU(),
                          nn.Linear(64, 10)).eval()
    return pk.finalize(pk.prune(model, pk.UnstructuredConfig(sparsity=sparsity, scope="layer"))), torch.randn(1, 256)


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> tuple[nn.Module, torch.Tensor, Path, Path, pk.ExportReport]:
    model, x = _mlp()
    folder = tmp_path_factory.mktemp("sparse_onnx")
    dense = export_onnx(model, folder / "dense.onnx", x)
    sparse = export_onnx(model, folder / "sparse.onnx", x, sparse_initializers=True)
    return model, x, dense.path, sparse.path, sparse


def _sparse_edit(path: Path, change) -> bytes:
    """The file's bytes with the first sparse initializer's (values, indices) replaced by `change`."""
    proto = onnx.load(str(path))
    init = proto.graph.sparse_initializer[0]
    values, indices = change(numpy_helper.to_array(init.values).copy(), numpy_helper.to_array(init.indices).copy())
    init.values.CopyFrom(numpy_helper.from_array(values, init.values.name))
    init.indices.CopyFrom(numpy_helper.from_array(indices, init.indices.name))
    return proto.SerializeToString()


def test_sparse_file_is_smaller_loads_and_matches(exported) -> None:
    model, x, dense_path, sparse_path, report = exported
    assert sparse_path.stat().st_size / dense_path.stat().st_size < 0.5
    proto = onnx.load(str(sparse_path))
    stored = {s.values.name for s in proto.graph.sparse_initializer}
    assert stored == set(report.sparse) and len(stored) == 3  # every 90 % weight, no bias
    assert not stored & {i.name for i in proto.graph.initializer}
    session = ort.InferenceSession(str(sparse_path), providers=["CPUExecutionProvider"])
    batch = torch.randn(5, 256)
    got = session.run(None, {session.get_inputs()[0].name: batch.numpy()})[0]
    with torch.no_grad():
        np.testing.assert_allclose(got, model(batch).numpy(), atol=1e-5, rtol=1e-5)
    result = check_onnx(model, sparse_path, x)
    assert len(result.tensors) == 3 and all(t.onnx_sparsity == t.sparsity for t in result.tensors)


def test_flipped_sparse_value_is_caught_by_name(exported) -> None:
    model, x, _, sparse_path, _ = exported

    def flip(values: np.ndarray, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        values[0] = -values[0]
        return values, indices

    name = onnx.load(str(sparse_path)).graph.sparse_initializer[0].values.name
    with pytest.raises(ExportCheckError, match=f"'{name}'.*values differ"):
        check_onnx(model, _sparse_edit(sparse_path, flip), x)


def test_moved_sparse_index_is_caught_as_lost_zeros(exported) -> None:
    model, x, _, sparse_path, _ = exported

    def move(values: np.ndarray, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        gap = int(np.flatnonzero(np.diff(indices) > 1)[0])  # a pruned slot right after a kept one
        indices[gap] += 1
        return values, indices

    with pytest.raises(ExportCheckError, match="sparsity dropped"):
        check_onnx(model, _sparse_edit(sparse_path, move), x)


def test_out_of_range_sparse_index_is_refused_by_name(exported) -> None:
    model, x, _, sparse_path, _ = exported

    def overflow(values: np.ndarray, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        indices[-1] = 10**9
        return values, indices

    name = onnx.load(str(sparse_path)).graph.sparse_initializer[0].values.name
    with pytest.raises(ExportCheckError, match=f"sparse initializer '{name}'"):
        check_onnx(model, _sparse_edit(sparse_path, overflow), x)


def test_half_sparse_weights_stay_dense(tmp_path: Path) -> None:
    # int64 indices make a float32 tensor smaller sparse only above 2/3 sparsity.
    model, x = _mlp(sparsity=0.5)
    report = export_onnx(model, tmp_path / "half.onnx", x, sparse_initializers=True)
    assert report.sparse == ()
    assert not onnx.load(str(report.path)).graph.sparse_initializer


def test_masked_conv_net_exports_sparse_and_checks(tmp_path: Path) -> None:
    torch.manual_seed(0)
    ctor, example = ZOO["residual_cnn"]
    model = pk.prune(ctor().eval(), pk.UnstructuredConfig(sparsity=0.9))  # masked, not finalized
    report = export_onnx(model, tmp_path / "cnn.onnx", example(), sparse_initializers=True)
    assert report.checked and report.sparse
    assert {t.name for t in report.tensors} >= {"conv1.weight", "conv2.weight"}


def test_masked_large_weight_exports_as_its_zeros(tmp_path: Path) -> None:
    # The exporter leaves a large `original * mask` as a run-time Mul of two dense tensors;
    # export_onnx exports the finalized weight instead, so the file holds the zeros.
    torch.manual_seed(0)
    model = pk.prune(nn.Sequential(nn.Linear(784, 300)).eval(), pk.UnstructuredConfig(sparsity=0.9))
    report = export_onnx(model, tmp_path / "big.onnx", torch.randn(1, 784), sparse_initializers=True)
    assert report.sparse and report.size_bytes < 0.5 * 784 * 300 * 4
