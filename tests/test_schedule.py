"""Schedules are pure functions of the step; GradualPruner is resumable from its state_dict."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import prunekit as pk


def test_cubic_values_at_start_middle_end() -> None:
    s = pk.Cubic(start_step=100, end_step=1100, every=1)
    assert s.sparsity_at(0, 0.9) == 0.0  # warm-up
    assert s.sparsity_at(100, 0.9) == 0.0
    # Zhu & Gupta: s_t = s_f + (s_i - s_f)(1 - (t - t0)/(n dt))^3 at half way: 0.9 * (1 - 0.125)
    assert s.sparsity_at(600, 0.9) == pytest.approx(0.9 * (1 - 0.5**3))
    assert s.sparsity_at(1100, 0.9) == pytest.approx(0.9)
    assert s.sparsity_at(5000, 0.9) == pytest.approx(0.9)


def test_schedule_holds_between_updates_and_is_monotone() -> None:
    s = pk.Cubic(start_step=0, end_step=100, every=10)
    values = [s.sparsity_at(t, 0.8) for t in range(120)]
    assert values[11] == values[19] == s.sparsity_at(10, 0.8)
    assert all(b >= a for a, b in zip(values, values[1:], strict=False))


def test_polynomial_initial_sparsity_and_power() -> None:
    s = pk.Polynomial(start_step=0, end_step=10, power=1, initial_sparsity=0.2)
    assert s.sparsity_at(0, 0.6) == pytest.approx(0.2)
    assert s.sparsity_at(5, 0.6) == pytest.approx(0.4)


def test_iterative_removes_same_share_each_round() -> None:
    s = pk.Iterative(steps=(10, 20, 30))
    assert s.sparsity_at(9, 0.875) == 0.0
    assert s.sparsity_at(10, 0.875) == pytest.approx(0.5)
    assert s.sparsity_at(25, 0.875) == pytest.approx(0.75)
    assert s.sparsity_at(30, 0.875) == pytest.approx(0.875)


def test_one_shot() -> None:
    assert pk.OneShot(step=5).sparsity_at(4, 0.5) == 0.0 and pk.OneShot(step=5).sparsity_at(5, 0.5) == 0.5


@pytest.mark.parametrize(
    ("factory", "field"),
    [(lambda: pk.Cubic(start_step=10, end_step=10), "end_step"), (lambda: pk.Iterative(steps=(3, 1)), "steps"),
     (lambda: pk.Cubic(end_step=10, power=2), "power"), (lambda: pk.Cubic(end_step=10, every=0), "every")],
)
def test_bad_schedules_name_the_field(factory, field: str) -> None:
    with pytest.raises(pk.ConfigError, match=field):
        factory()


def _train(model: nn.Module, pruner: pk.GradualPruner, steps: range, seed: int) -> torch.optim.Optimizer:
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    for step in steps:
        x = torch.randn(16, 12, generator=g)
        loss = (model(x) - x[:, :3]).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        pruner.step(step)
    return opt


def _make() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(12, 24), nn.ReLU(), nn.Linear(24, 3))


@pytest.mark.parametrize("criterion", ["l1", "random"])
def test_gradual_resume_gives_same_masks(criterion: str) -> None:
    cfg, sched = pk.UnstructuredConfig(sparsity=0.8, criterion=criterion), pk.Cubic(end_step=40, every=5)
    full = _make()
    full_pruner = pk.GradualPruner(full, cfg, sched)
    # One uninterrupted run; the data depends only on the step, so a resumed run sees the same.
    for step in range(60):
        _train(full, full_pruner, range(step, step + 1), seed=step)

    first = _make()
    pruner = pk.GradualPruner(first, cfg, sched)
    for step in range(23):
        _train(first, pruner, range(step, step + 1), seed=step)
    state = copy.deepcopy(pruner.state_dict())
    weights = copy.deepcopy(first.state_dict())

    resumed = _make()
    resumed_pruner = pk.GradualPruner(resumed, cfg, sched)
    resumed_pruner.load_state_dict(state)
    resumed.load_state_dict(weights)
    for step in range(23, 60):
        _train(resumed, resumed_pruner, range(step, step + 1), seed=step)

    assert resumed_pruner.current_sparsity == full_pruner.current_sparsity == pytest.approx(0.8)
    masks = pk.core.masks.mask_state_dict
    for a, b in zip(masks(full).values(), masks(resumed).values(), strict=True):
        assert torch.equal(a, b)


def test_gradual_pruner_reaches_target_and_keeps_pruned_weights_dead() -> None:
    model = _make()
    pruner = pk.GradualPruner(model, pk.UnstructuredConfig(sparsity=0.9, scope="layer"), pk.Cubic(end_step=30, every=3))
    seen_dead: torch.Tensor | None = None
    g = torch.Generator().manual_seed(0)
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    for step in range(40):
        x = torch.randn(8, 12, generator=g)
        loss = model(x).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        pruner.step(step)
        dead = model[0].weight == 0
        if seen_dead is not None:
            assert dead[seen_dead].all(), f"a pruned weight came back at step {step}"
        seen_dead = dead.clone()
    assert pk.sparsity(model).layers["0"] == pytest.approx(0.9, abs=1 / 288)


def test_gradual_pruner_rejects_bad_state() -> None:
    pruner = pk.GradualPruner(_make(), pk.UnstructuredConfig(sparsity=0.5), pk.OneShot())
    with pytest.raises(pk.CheckpointError, match="missing"):
        pruner.load_state_dict({"masks": {}})
