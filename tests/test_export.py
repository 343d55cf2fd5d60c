"""Checkpoints: exact round trips, files that shrink with sparsity, and safe failure on bad files."""

from __future__ import annotations

import os
import pickle

import pytest
import torch
from torch import nn

import prunekit as pk
from prunekit.core.masks import masked_modules
from tests.models import ZOO


def _pruned(sparsity: float) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(256, 128), nn.ReLU(), nn.Linear(128, 10))
    return pk.prune(model, pk.UnstructuredConfig(sparsity=sparsity)) if sparsity else model


@pytest.mark.parametrize("name", list(ZOO))
def test_round_trip_keeps_outputs_and_sparsity(tmp_path, name: str) -> None:
    build, example = ZOO[name]
    torch.manual_seed(0)
    model, x = build().eval(), example()
    pk.prune(model, pk.UnstructuredConfig(sparsity=0.7))
    expected = model(x)
    pk.save(model, tmp_path / "m.safetensors")
    restored = pk.load(tmp_path / "m.safetensors", build().eval())
    torch.testing.assert_close(restored(x), expected, rtol=0, atol=0)
    assert pk.sparsity(restored).layers == pk.sparsity(model).layers


def test_load_into_masked_model_restores_masks(tmp_path) -> None:
    model = _pruned(0.8)
    pk.save(model, tmp_path / "m.safetensors")
    target = pk.prune(_pruned(0.0), pk.UnstructuredConfig(sparsity=0.1))
    pk.load(tmp_path / "m.safetensors", target)
    assert set(masked_modules(target)) == {"0", "2"}
    assert pk.sparsity(target).total == pytest.approx(pk.sparsity(model).total)


def test_file_shrinks_with_sparsity(tmp_path) -> None:
    sizes = {s: pk.save(_pruned(s), tmp_path / f"{s}.safetensors").size_bytes for s in (0.0, 0.5, 0.9, 0.95)}
    assert sizes[0.0] > sizes[0.5] > sizes[0.9] > sizes[0.95]
    assert sizes[0.9] < 0.15 * sizes[0.0]
    assert os.path.getsize(tmp_path / "0.9.safetensors") == sizes[0.9]


def test_dense_file_is_plain_safetensors(tmp_path) -> None:
    from safetensors.torch import load_file

    model = _pruned(0.0)
    pk.save(model, tmp_path / "d.safetensors")
    plain = load_file(tmp_path / "d.safetensors")
    assert all(torch.equal(plain[k], v) for k, v in model.state_dict().items())


def test_pickle_is_refused_without_running_it(tmp_path) -> None:
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    path = tmp_path / "evil.safetensors"
    path.write_bytes(pickle.dumps(Evil()))
    with pytest.raises(pk.CheckpointError, match="not a valid safetensors file"):
        pk.load(path, _pruned(0.0))
    assert not marker.exists()


@pytest.mark.parametrize("cut", [0.5, 0.9, 0.999])
def test_truncated_file_is_refused_and_model_untouched(tmp_path, cut: float) -> None:
    path = tmp_path / "m.safetensors"
    pk.save(_pruned(0.9), path)
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * cut)])
    target = _pruned(0.0)
    before = {k: v.clone() for k, v in target.state_dict().items()}
    with pytest.raises(pk.CheckpointError, match="m.safetensors"):
        pk.load(path, target)
    assert all(torch.equal(v, before[k]) for k, v in target.state_dict().items())


def test_corrupt_compressed_payload_is_refused(tmp_path) -> None:
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    path = tmp_path / "m.safetensors"
    pk.save(_pruned(0.9), path)
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    tensors = load_file(path)
    tensors["0.weight::values"] = torch.zeros_like(tensors["0.weight::values"])
    save_file(tensors, path, metadata=meta)
    with pytest.raises(pk.CheckpointError, match="0.weight"):
        pk.load(path, _pruned(0.0))


def test_shape_mismatch_names_tensor(tmp_path) -> None:
    pk.save(_pruned(0.5), tmp_path / "m.safetensors")
    other = nn.Sequential(nn.Linear(256, 64), nn.ReLU(), nn.Linear(64, 10))
    with pytest.raises(pk.CheckpointError, match=r"tensor '0\.(weight|bias)' is \(128"):
        pk.load(tmp_path / "m.safetensors", other)


def test_missing_file_is_named(tmp_path) -> None:
    with pytest.raises(pk.CheckpointError, match="nope.safetensors"):
        pk.load(tmp_path / "nope.safetensors", _pruned(0.0))


def test_failed_save_leaves_previous_file_intact(tmp_path, monkeypatch) -> None:
    path = tmp_path / "m.safetensors"
    pk.save(_pruned(0.5), path)
    previous = path.read_bytes()

    def broken_fsync(fd: int) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(os, "fsync", broken_fsync)
    with pytest.raises(OSError):
        pk.save(_pruned(0.9), path)
    assert path.read_bytes() == previous
    assert [p.name for p in tmp_path.iterdir()] == ["m.safetensors"]


def test_tied_weights_are_stored_once_and_stay_tied_on_load(tmp_path) -> None:
    def build() -> nn.Module:
        model = nn.Sequential(nn.Embedding(50, 16), nn.Linear(16, 50, bias=False))
        model[1].weight = model[0].weight  # tied, as in a language model's embedding and head
        return model

    model = build()
    report = pk.save(model, tmp_path / "tied.safetensors")
    again = pk.load(tmp_path / "tied.safetensors", build)
    assert again[1].weight is again[0].weight
    assert torch.equal(again[0].weight, model[0].weight)
    assert report.params == 50 * 16
