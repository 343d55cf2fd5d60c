"""SparseGPT: reconstruction beats magnitude and Wanda, patterns hold, Hessian edge cases."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import prunekit as pk
from prunekit.core.plan import MaskPlan
from prunekit.errors import PlanError
from prunekit.methods.calibration import Pattern
from prunekit.methods.nm import NMConfig, check_nm
from prunekit.methods.sparsegpt import inverse_hessian_factor, sparsegpt_layer


def _correlated_inputs(rows: int = 512, dim: int = 32, seed: int = 0) -> torch.Tensor:
    """Inputs with strongly correlated features and uneven scales (like LLM activations)."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(dim, dim, generator=g) * 0.5 + torch.eye(dim)
    scale = torch.logspace(-0.5, 0.5, dim)
    return (torch.randn(rows, dim, generator=g) @ mix) * scale


@pytest.mark.parametrize("config", [
    pk.UnstructuredConfig(sparsity=0.5, scope="layer"),
    NMConfig(n=2, m=4),
    NMConfig(n=4, m=8),
], ids=["50%", "2:4", "4:8"])
def test_sparsegpt_reconstructs_better_than_magnitude_and_wanda(config) -> None:
    torch.manual_seed(0)
    x = _correlated_inputs()
    data = [x[i : i + 128] for i in range(0, 512, 128)]
    errors, w = {}, torch.randn(16, 32, generator=torch.Generator().manual_seed(1))
    for criterion in ("l1", "wanda", "sparsegpt"):
        layer = nn.Sequential(nn.Linear(32, 16, bias=False))
        with torch.no_grad():
            layer[0].weight.copy_(w)
        pk.prune(layer, config.model_copy(update={"criterion": criterion}), data=data)
        with torch.no_grad():
            errors[criterion] = float((layer(x) - x @ w.T).pow(2).mean())
    # N:M leaves SparseGPT less room (the last group of each row has no later columns to
    # absorb its error), so its margin is smaller there than for unstructured sparsity.
    assert errors["sparsegpt"] < 0.95 * min(errors["wanda"], errors["l1"])
    assert errors["wanda"] <= errors["l1"] * 1.05


@pytest.mark.parametrize(("n", "m"), [(2, 4), (1, 4), (4, 8)])
def test_sparsegpt_layer_obeys_nm_and_zeroes_pruned_weights(n: int, m: int) -> None:
    x = _correlated_inputs(256, 16)
    w = torch.randn(8, 16)
    keep, new = sparsegpt_layer(w, 2 * x.T @ x / 256, Pattern("nm", n=n, m=m), blocksize=8)
    assert (keep.reshape(-1, m).sum(dim=1) == n).all()
    assert (new[~keep] == 0).all() and not torch.equal(new[keep], w[keep])  # kept weights updated


def test_sparsegpt_unstructured_hits_the_sparsity_and_respects_a_previous_mask() -> None:
    x = _correlated_inputs(256, 32)
    w = torch.randn(8, 32)
    previous = torch.rand(8, 32, generator=torch.Generator().manual_seed(3)) > 0.25
    keep, _ = sparsegpt_layer(w, 2 * x.T @ x / 256, Pattern("unstructured", sparsity=0.5), keep=previous)
    assert int((~keep).sum()) == 128
    assert not (keep & ~previous).any()


def test_dead_inputs_and_rank_deficient_hessian_are_damped() -> None:
    x = _correlated_inputs(8, 16)  # 8 rows < 16 inputs: singular X^T X
    x[:, 3] = 0.0  # a dead input feature
    keep, new = sparsegpt_layer(torch.randn(4, 16), 2 * x.T @ x / 8, Pattern("nm", n=2, m=4))
    assert torch.isfinite(new).all() and (new[:, 3] == 0).all()
    assert (keep.reshape(-1, 4).sum(dim=1) == 2).all()


def test_hessian_that_damping_cannot_fix_is_a_clear_error() -> None:
    with pytest.raises(PlanError, match="layer 'blk.fc'.*singular even with damping"):
        inverse_hessian_factor(-torch.eye(4), "blk.fc")


def test_sparsegpt_plan_carries_weights_and_apply_writes_them_atomically() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 4))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    plan = pk.plan(model, NMConfig(n=2, m=4, criterion="sparsegpt"), data=[torch.randn(64, 16)])
    assert set(plan.weights) == {"0.weight", "2.weight"} and "reconstructed" in plan.summary()
    bad = MaskPlan(dict(plan.masks), {**plan.weights, "2.weight": torch.zeros(3, 3)})
    with pytest.raises(PlanError, match="'2.weight'"):
        bad.apply(model)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    plan.apply(model)
    torch.testing.assert_close(model[0].weight, plan.weights["0.weight"] * plan.masks["0.weight"])
    assert check_nm(model, 2, 4).ok
    pk.finalize(model)
    assert check_nm(model, 2, 4).ok


def test_too_little_data_is_logged(caplog) -> None:
    model = nn.Sequential(nn.Linear(16, 8))
    pk.prune(model, NMConfig(n=2, m=4, criterion="sparsegpt"), data=[torch.randn(4, 16)])
    assert "'0': 4 calibration rows for 16 inputs" in caplog.text
    assert check_nm(model, 2, 4).ok


def test_solver_runs_in_float32_under_autocast() -> None:
    """Forwards may run under bf16 autocast; the Hessian and OBS updates must not."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 32))
    data = [_correlated_inputs(128, 64)]
    reference = pk.plan(model, NMConfig(n=2, m=4, criterion="sparsegpt"), data=data)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = pk.plan(model, NMConfig(n=2, m=4, criterion="sparsegpt"), data=data)
    assert torch.equal(mixed.masks["0.weight"], reference.masks["0.weight"])
    torch.testing.assert_close(mixed.weights["0.weight"], reference.weights["0.weight"])
