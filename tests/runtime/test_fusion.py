"""Sibling fusion: found by shared input, one stacked call, each member's rows, and accelerate's choice."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import prunekit as pk
from prunekit.runtime import autotune as acc
from prunekit.runtime import candidates as cand
from prunekit.runtime import fusion

pytest.importorskip("numba")


class Attention(nn.Module):
    """q, k, v read the same input; `out` reads their concatenation; `shared` is called twice."""

    def __init__(self) -> None:
        super().__init__()
        self.q, self.k, self.v = nn.Linear(64, 32), nn.Linear(64, 16, bias=False), nn.Linear(64, 16)
        self.out, self.shared = nn.Linear(64, 64), nn.Linear(64, 64)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.out(torch.cat([self.q(x), self.k(x), self.v(x)], dim=-1))
        return self.shared(self.shared(h))


def _pruned() -> nn.Module:
    torch.manual_seed(0)
    return pk.prune(Attention(), pk.UnstructuredConfig(sparsity=0.9, scope="layer"))


def test_siblings_are_the_layers_that_read_one_tensor() -> None:
    model = _pruned()
    names = ["q", "k", "v", "out", "shared"]
    assert fusion.sibling_groups(model, names, torch.randn(2, 64)) == [["q", "k", "v"]]


def test_fused_members_match_the_separate_layers_and_recompute_for_a_new_input() -> None:
    model = _pruned()
    layers = [model.q, model.k, model.v]
    weight, bias = fusion.stacked([m.weight for m in layers], [m.bias for m in layers])
    assert weight.shape == (64, 64) and bias is not None and bias[32:48].eq(0).all()  # k has no bias
    calls = []
    dense = nn.Linear(64, 64)
    with torch.no_grad():
        dense.weight.copy_(weight)
        dense.bias.copy_(bias)
    dense.register_forward_hook(lambda *_: calls.append(1))
    group = fusion.FusedLinears(dense, [32, 16, 16], ["q", "k", "v"])
    members = [group.member(i) for i in range(3)]
    with torch.no_grad():
        for x in (torch.randn(3, 64), torch.randn(1, 5, 64)):
            for member, layer in zip(reversed(members), reversed(layers), strict=True):  # any order
                torch.testing.assert_close(member(x), layer(x))
        assert len(calls) == 2  # one stacked call per input
        x = torch.randn(1, 64)
        members[0](x)
        members[0](x)  # q twice with the same tensor: served once, then recomputed
        assert len(calls) == 4
        assert group._input is x  # k and v still to come: the result is kept for them
        members[1](x), members[2](x)
        assert len(calls) == 4 and group._input is None  # all served: references dropped


def _fake_measure(model, built, inputs, repeats, warmup, fallback="dense"):
    """Sparse kernels 3x faster than dense; a fused call half the separate calls' time."""
    speed = {"dense": 1.0, "numba_csr": 1 / 3, "chosen": 1 / 3, "only_q": 0.1, "separate": 0.5, "fused": 0.25}
    return {fqn: {n: [speed[n.partition(":")[0]]] for n in per} for fqn, per in built.items()}


def test_accelerate_fuses_siblings_that_chose_one_kernel(monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    model = _pruned()
    x = torch.randn(2, 64)
    with torch.no_grad():
        ref = model(x)
    monkeypatch.setattr(acc, "_measure", _fake_measure)
    pk.accelerate(model, x, candidates=["dense", "numba_csr"])
    assert "fused" in capsys.readouterr().out  # the printed decision table marks fused layers
    assert "fused with q, v" in model.prunekit_acceleration.summary()
    assert [type(getattr(model, n)).__name__ for n in ("q", "k", "v", "out")] == ["FusedLinear"] * 3 + [
        "NumbaSparseLinear"
    ]
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref, rtol=1e-5, atol=1e-5)
    rows = {d.fqn: d for d in model.prunekit_acceleration.layers}
    assert rows["k"].fused_with == ["q", "v"] and "fused (b1 0.750 vs 1.500 ms" in rows["k"].reason
    assert rows["out"].fused_with == []


def test_accelerate_keeps_siblings_separate_when_told_or_slower(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(acc, "_measure", _fake_measure)
    model = pk.accelerate(_pruned(), torch.randn(2, 64), candidates=["dense", "numba_csr"], fuse=False, verbose=False)
    assert type(model.q).__name__ == "NumbaSparseLinear"

    def fused_slower(model, built, inputs, repeats, warmup, fallback="dense"):
        times = _fake_measure(model, built, inputs, repeats, warmup)
        return {f: {n: [0.75] if n.startswith("fused") else t for n, t in per.items()} for f, per in times.items()}

    monkeypatch.setattr(acc, "_measure", fused_slower)
    model = pk.accelerate(_pruned(), torch.randn(2, 64), candidates=["dense", "numba_csr"], verbose=False)
    assert type(model.q).__name__ == "NumbaSparseLinear"
    assert "not fused (b1 2.250 vs 1.500 ms" in next(d for d in model.prunekit_acceleration.layers).reason


def test_siblings_on_different_kernels_fuse_with_one_that_takes_the_stack(
    monkeypatch: pytest.MonkeyPatch, extra_candidate
) -> None:
    def only_q(info: cand.LayerInfo) -> nn.Module | None:  # a kernel for q alone: none for the stacked weight
        return cand.DenseLinear(info.fqn, info.weight, info.bias) if info.fqn == "q" else None

    extra_candidate("only_q", only_q)
    monkeypatch.setattr(acc, "_measure", _fake_measure)
    model = _pruned()
    x = torch.randn(2, 64)
    with torch.no_grad():
        ref = model(x)
    pk.accelerate(model, x, candidates=["dense", "numba_csr", "only_q"], verbose=False)
    rows = {d.fqn: d for d in model.prunekit_acceleration.layers}
    assert [rows[f].choice for f in "qkv"] == ["numba_csr"] * 3  # q chose only_q alone; the stack runs numba_csr
    assert rows["q"].fused_with == ["k", "v"] and type(model.q).__name__ == "FusedLinear"
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref, rtol=1e-5, atol=1e-5)


def test_an_accelerated_model_deep_copies_with_its_kernels_and_groups(monkeypatch: pytest.MonkeyPatch) -> None:
    import copy

    monkeypatch.setattr(acc, "_measure", _fake_measure)
    model = pk.accelerate(_pruned(), torch.randn(2, 64), candidates=["dense", "numba_csr"], verbose=False)
    twin = copy.deepcopy(model)
    assert twin.q.group is twin.k.group is not model.q.group  # the group is shared within each copy
    assert twin.out._run is not model.out._run  # kernels rebound to the copy's arrays
    x = torch.randn(4, 64)
    with torch.no_grad():
        torch.testing.assert_close(twin(x), model(x))


def test_kernels_take_inputs_that_require_grad_under_no_grad(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(acc, "_measure", _fake_measure)
    model = pk.accelerate(_pruned(), torch.randn(2, 64), candidates=["dense", "numba_csr"], verbose=False)
    x = torch.randn(3, 64, requires_grad=True)
    with torch.no_grad():
        assert model(x).shape == (3, 64)


def test_real_measurement_with_siblings_matches_dense() -> None:
    model = _pruned()
    x = torch.randn(2, 64)
    with torch.no_grad():
        ref = model(x)
    pk.accelerate(model, x, batch_sizes=(1, 2), repeats=2, warmup=1, verbose=False)
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref, rtol=1e-4, atol=1e-5)
    rows = [d for d in model.prunekit_acceleration.layers if d.fqn in ("q", "k", "v")]
    if all(d.choice != "dense" for d in rows):  # then the group was timed fused: the table says how it went
        assert all("fused (b1" in d.reason for d in rows)
