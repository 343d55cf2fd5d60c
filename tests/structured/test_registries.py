"""Extension points of structured pruning: group criteria, op rules, layer handlers, the level protocol."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest
import torch
from torch import nn

import prunekit as pk
from prunekit._registry import Registry
from prunekit.structured import (
    get_layer_handler,
    get_op_rule,
    list_group_criteria,
    list_layer_handlers,
    list_op_rules,
    register_group_criterion,
    register_layer_handler,
    register_op_rule,
    select,
)
from prunekit.structured.groups import Group
from prunekit.structured.select import GroupCriterionInfo, ScoreInputs


@pytest.fixture
def scratch_group_criteria(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """A copy of the group-criterion table for one test: what it registers is gone afterwards."""
    scratch: Registry[str, GroupCriterionInfo] = Registry(select.GROUP_CRITERIA.what)
    for name, info in select.GROUP_CRITERIA.items():
        scratch.register(name, info)
    monkeypatch.setattr(select, "GROUP_CRITERIA", scratch)
    yield


def test_registered_group_criterion_validates_and_is_used_by_plan(scratch_group_criteria: None) -> None:
    calls: list[str] = []

    @register_group_criterion("by_position", reference="test: keeps the last units")
    def by_position(group: Group, inputs: ScoreInputs) -> np.ndarray:
        calls.append(group.name)
        return np.arange(group.size, dtype=np.float64)  # higher keeps: the first units go

    config = pk.ChannelConfig(ratio=0.5, criterion="by_position")
    assert "by_position" in list_group_criteria()
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)).eval()
    plan = pk.plan(model, config, example_inputs=torch.randn(2, 4))
    assert calls, "the registered criterion was not asked for scores"
    assert plan.keep["0.weight"][0] == [4, 5, 6, 7]
    assert plan.config.criterion == "by_position"
    assert type(plan).from_dict(plan.to_dict()).config == config  # a saved plan reloads while registered


def test_registration_is_cleaned_up() -> None:
    """Runs after the test above in file order: its criterion did not leak into the real table."""
    assert "by_position" not in list_group_criteria()
    with pytest.raises(pk.ConfigError, match="by_position"):
        pk.ChannelConfig(ratio=0.5, criterion="by_position")


def test_unknown_group_criterion_names_the_field_and_the_known_ones() -> None:
    with pytest.raises(pk.ConfigError, match=r"ChannelConfig\.criterion: .*'bogus'.*known: bn_scale, l1, l2"):
        pk.ChannelConfig(ratio=0.5, criterion="bogus")


def test_group_criterion_registers_once(scratch_group_criteria: None) -> None:
    with pytest.raises(pk.ConfigError, match="'l1' is already registered"):
        register_group_criterion("l1")(lambda group, inputs: np.zeros(group.size))


def test_channel_config_level_protocol() -> None:
    config = pk.ChannelConfig(ratio=0.3, head_ratio=0.25, scope="global", exclude=["fc"], round_to=8)
    assert config.with_level(0.6) == config.model_copy(update={"ratio": 0.6})
    rule = config.as_layer_rule()
    assert rule.exclude == () and rule.scope == "layer"
    assert (rule.ratio, rule.head_ratio, rule.round_to) == (0.3, 0.25, 8)


def test_op_rule_lookup_misses_are_barriers_not_errors() -> None:
    aten = torch.ops.aten
    assert get_op_rule(aten.linear.default) is not None
    assert get_op_rule(aten.flip.default) is None  # no rule: a barrier
    assert "aten.linear.default" in list_op_rules() and "aten.matmul.default" in list_op_rules()
    with pytest.raises(pk.ConfigError, match="already registered"):
        register_op_rule(aten.linear.default)(lambda ctx, node: [])


def test_layer_handler_lookup_follows_the_mro_and_misses_are_none() -> None:
    class MyLinear(nn.Linear):
        pass

    assert get_layer_handler(MyLinear(2, 3)) is get_layer_handler(nn.Linear(2, 3)) is not None
    assert get_layer_handler(nn.Flatten()) is None
    assert {"Linear", "Conv1D", "LayerNorm"} <= set(list_layer_handlers())
    with pytest.raises(pk.ConfigError, match="'Linear' is already registered"):
        register_layer_handler(nn.Linear, shrinkable=lambda m: {}, outputs=lambda m: {})(lambda m: None)
