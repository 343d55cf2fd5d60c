"""Invariant 1: a structurally pruned model computes what the zero-masked dense model computes."""

from __future__ import annotations

import pytest
import torch

import prunekit
from prunekit.measure.bench import count_params
from prunekit.structured import get_group_criterion, list_group_criteria
from tests.models import ZOO
from tests.structured.helpers import assert_equivalent


@pytest.mark.parametrize("name", sorted(ZOO))
@pytest.mark.parametrize("ratio", [0.3, 0.5])
def test_zoo_pruned_matches_zeroed(name: str, ratio: float) -> None:
    ctor, make_input = ZOO[name]
    torch.manual_seed(0)
    model, x = ctor().eval(), make_input()
    plan = prunekit.plan(model, prunekit.ChannelConfig(ratio=ratio), x)
    pruned = assert_equivalent(model, plan, x)
    assert plan.groups and sum(g["removed"] for g in plan.groups) > 0
    assert count_params(pruned) < count_params(model)
    assert plan.stats["params_after"] == count_params(pruned)


@pytest.mark.parametrize("criterion", [c for c in list_group_criteria() if not get_group_criterion(c).needs_data])
@pytest.mark.parametrize("scope", ["layer", "global"])
def test_criteria_and_scopes_stay_equivalent(criterion: str, scope: str) -> None:
    ctor, make_input = ZOO["residual_cnn"]
    torch.manual_seed(1)
    model, x = ctor().eval(), make_input()
    plan = prunekit.plan(model, prunekit.ChannelConfig(ratio=0.4, criterion=criterion, scope=scope), x)
    assert_equivalent(model, plan, x)
    assert sum(g["removed"] for g in plan.groups) > 0


def test_taylor_uses_data() -> None:
    ctor, make_input = ZOO["residual_cnn"]
    torch.manual_seed(2)
    model, x = ctor().eval(), make_input()
    data = [(x, torch.tensor([1, 3]))]
    plan = prunekit.plan(model, prunekit.ChannelConfig(ratio=0.5, criterion="taylor"), x, data=data)
    assert_equivalent(model, plan, x)
    with pytest.raises(prunekit.ConfigError, match="data"):
        prunekit.plan(model, prunekit.ChannelConfig(ratio=0.5, criterion="taylor"), x)


def test_round_to_keeps_multiples() -> None:
    ctor, make_input = ZOO["mlp"]
    model, x = ctor().eval(), make_input()
    plan = prunekit.plan(model, prunekit.ChannelConfig(ratio=0.5, round_to=12), x)
    kept = {g["name"]: g["units"] - g["removed"] for g in plan.groups}
    assert all(k % 12 == 0 or k == g["units"] for k, g in zip(kept.values(), plan.groups, strict=True))
    assert kept["1"] == 24  # 32 units, half removed = 16 kept, rounded up to 24
