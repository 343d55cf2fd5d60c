"""Sparse checkpoints: INT8 values round-trip exactly, and bytes shrink with sparsity and INT8."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

import prunekit as pk
from prunekit.deploy.quantize import DynamicInt8Config, quantize
from prunekit.errors import CheckpointError
from prunekit.zoo.models import lenet_300_100

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::UserWarning")


def _lenet(sparsity: float, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = lenet_300_100()
    return pk.finalize(pk.prune(model, pk.UnstructuredConfig(sparsity=sparsity))) if sparsity else model


def _dense_bytes(model: nn.Module, path: Path) -> int:
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path.stat().st_size


def test_int8_checkpoint_round_trips_exactly(tmp_path: Path) -> None:
    q = quantize(_lenet(0.9), DynamicInt8Config())
    report = pk.save(q, tmp_path / "q.safetensors")
    fresh = quantize(_lenet(0.0, seed=1), DynamicInt8Config())
    pk.load(report.path, fresh)
    for fqn in ("1", "3", "5"):
        a, b = q.get_submodule(fqn).weight(), fresh.get_submodule(fqn).weight()
        assert torch.equal(a.int_repr(), b.int_repr())
        assert torch.equal(a.q_per_channel_scales(), b.q_per_channel_scales())
        assert torch.equal(q.get_submodule(fqn).bias(), fresh.get_submodule(fqn).bias())
    x = torch.rand(16, 1, 28, 28)
    assert torch.equal(q(x), fresh(x))


def test_int8_checkpoint_stores_int8_tensors(tmp_path: Path) -> None:
    from prunekit.deploy.checkpoint import read_checkpoint

    q = quantize(_lenet(0.9), DynamicInt8Config())
    state, _ = read_checkpoint(pk.save(q, tmp_path / "q.safetensors").path)
    assert state["1.weight"].dtype == torch.int8 and state["1.weight_scale"].shape == (300,)
    assert float((state["1.weight"] == 0).float().mean()) >= 0.85


def test_int8_checkpoint_does_not_fit_a_float_model(tmp_path: Path) -> None:
    q = quantize(_lenet(0.9), DynamicInt8Config())
    path = pk.save(q, tmp_path / "q.safetensors").path
    with pytest.raises(CheckpointError, match="weight_scale"):
        pk.load(path, lenet_300_100())


def test_bytes_shrink_with_sparsity_and_int8(tmp_path: Path) -> None:
    dense = _dense_bytes(_lenet(0.0), tmp_path / "dense.safetensors")
    sizes = {}
    for sparsity in (0.5, 0.9):
        model = _lenet(sparsity)
        sizes[sparsity, "fp32"] = pk.save(model, tmp_path / f"f{sparsity}.safetensors").size_bytes
        sizes[sparsity, "int8"] = pk.save(quantize(model, DynamicInt8Config()),
                                          tmp_path / f"q{sparsity}.safetensors").size_bytes
    assert sizes[0.9, "fp32"] < sizes[0.5, "fp32"] < dense
    assert sizes[0.9, "int8"] < sizes[0.5, "int8"] < sizes[0.5, "fp32"]
    # Bitmask (~0.47 bit/param at 90 %) + one byte per non-zero: better than 1/20 of fp32.
    assert sizes[0.9, "int8"] * 20 <= dense
