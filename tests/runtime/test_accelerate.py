"""accelerate(): installs measured winners, keeps dense otherwise, matches dense outputs, saves its table."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import prunekit as pk
from prunekit.errors import ConfigError, PrunekitError, UnsupportedLayerError
from prunekit.runtime import autotune as acc
from prunekit.runtime import candidates as cand

pytest.importorskip("numba")


def _mlp(sparsity: float = 0.9) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 32), nn.ReLU(), nn.Linear(32, 4))
    return pk.prune(model, pk.UnstructuredConfig(sparsity=sparsity, scope="layer"))


def _fake_measure(winner: str):
    """A `_measure` that reports `winner` 3x faster than dense and every other candidate 2x slower."""

    def measure(model, built, inputs, repeats, warmup, fallback="dense"):
        times = {}
        for fqn, per in built.items():
            times[fqn] = {n: [1.0 if n == "dense" else (1 / 3 if n in (winner, "chosen") else 2.0)] for n in per}
        return times

    return measure


def test_installs_the_winner_keeps_names_and_outputs(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    model = _mlp()
    x = torch.randn(3, 64)
    with torch.no_grad():
        ref = model(x)
    monkeypatch.setattr(acc, "_measure", _fake_measure("numba_csr"))
    out = pk.accelerate(model, x, table_path=tmp_path / "t.json", verbose=False)
    assert out is model
    assert [type(model[i]).__name__ for i in (0, 2, 4)] == ["NumbaSparseLinear"] * 3
    assert model[2].fqn == "2"
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(model(x[:1].expand(2, 5, 64)), ref[:1].expand(2, 5, 4), rtol=1e-5, atol=1e-5)
    table = json.loads((tmp_path / "t.json").read_text())
    assert [row["choice"] for row in table["layers"]] == ["numba_csr"] * 3
    assert table["layers"][0]["shape"] == [128, 64] and table["batch_sizes"] == [1, 8]
    assert set(table["layers"][0]["ms"]) >= {"dense", "onednn", "torch_csr", "numba_csr"}
    assert "dense_int8" not in table["layers"][0]["ms"]  # INT8 only when allowed
    assert table["max_rel_error"] <= 1e-4
    assert (table["format"], table["report_version"]) == ("prunekit.acceleration_report", 1)


def test_keeps_dense_when_nothing_wins(monkeypatch: pytest.MonkeyPatch) -> None:
    model = _mlp()
    before = [model[i] for i in (0, 2, 4)]
    monkeypatch.setattr(acc, "_measure", _fake_measure("nothing"))
    pk.accelerate(model, torch.randn(1, 64), verbose=False)
    assert [model[i] for i in (0, 2, 4)] == before
    assert all(d.choice == "dense" and "faster" in d.reason for d in model.prunekit_acceleration.layers)


def test_choice_never_slower_than_dense_by_5_percent() -> None:
    d = acc.LayerDecision(
        "fc",
        (8, 8),
        0.9,
        None,
        {"dense": {1: 1.0, 8: 1.0}, "a": {1: 0.2, 8: 1.1}, "b": {1: 0.5, 8: 0.9}, "c": {1: 0.95, 8: 0.95}},
    )
    acc._choose(d, (1, 8), margin=0.1)
    assert d.choice == "b"  # a is faster on average but 10 % slower at batch 8; c wins by too little


def test_real_measurement_matches_dense(tmp_path) -> None:
    model = _mlp()
    x = torch.randn(2, 64)
    with torch.no_grad():
        ref = model(x)
    pk.accelerate(model, x, batch_sizes=(1, 4), repeats=2, warmup=1, table_path=tmp_path / "t.json", verbose=False)
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref, rtol=1e-4, atol=1e-5)
    choices = {row["choice"] for row in json.loads((tmp_path / "t.json").read_text())["layers"]}
    assert choices <= set(cand.list_candidates()) - {n for n in cand.list_candidates() if cand.is_int8_candidate(n)}


def test_wrong_outputs_restore_the_model(monkeypatch: pytest.MonkeyPatch, extra_candidate) -> None:
    class Broken(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.zeros(*x.shape[:-1], 128)

    extra_candidate("broken", lambda info: Broken() if info.fqn == "0" else None)
    monkeypatch.setattr(acc, "_measure", _fake_measure("broken"))
    model = _mlp()
    before = list(model)
    with pytest.raises(PrunekitError, match=r"after replacing 1 layers \(broken: 1; 0\); model restored"):
        pk.accelerate(model, torch.randn(2, 64), candidates=["dense", "broken"], verbose=False)
    assert list(model) == before


def test_bad_input_is_a_clear_error() -> None:
    with pytest.raises(ConfigError, match="batch_sizes"):
        pk.accelerate(_mlp(), torch.randn(1, 64), batch_sizes=(0,), verbose=False)
    with pytest.raises(ConfigError, match="nope"):
        pk.accelerate(_mlp(), torch.randn(1, 64), candidates=["nope"], verbose=False)
    with pytest.raises(UnsupportedLayerError, match="prune it first"):
        pk.accelerate(nn.Sequential(nn.Linear(4, 4)), torch.randn(1, 4), verbose=False)


def test_candidates_are_listed_sorted_and_a_miss_names_them() -> None:
    names = cand.list_candidates()
    assert names == sorted(names) and {"dense", "numba_csr", "numba_nm24r_int8_1t"} <= set(names)
    with pytest.raises(ConfigError, match=r"unknown candidate 'nope'; known: .*numba_csr"):
        cand.get_candidate("nope")
    with pytest.raises(ConfigError, match="candidate 'dense' is already registered"):
        cand.register_candidate("dense")(lambda info: None)
    assert cand.is_int8_candidate("numba_nm24_int8_1t") and not cand.is_int8_candidate("numba_nm24_1t")


def test_leaves_multihead_attention_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    # nn.MultiheadAttention uses out_proj.weight directly, so replacing out_proj would break it
    model = nn.ModuleDict({"attn": nn.MultiheadAttention(16, 2, batch_first=True), "fc": nn.Linear(16, 16)})
    with torch.no_grad():
        model["attn"].out_proj.weight[:, :12] = 0
        model["fc"].weight[:, :12] = 0
    assert set(acc._eligible(model, 0.5)) == {"fc"}
