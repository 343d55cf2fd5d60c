"""Plans print, serialise and replay; structured checkpoints reload without pickle."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch

import prunekit
from prunekit.structured import ChannelPlan
from tests.models import ZOO, ResidualCNN
from tests.structured.helpers import run


def _planned(ratio: float = 0.5) -> tuple[torch.nn.Module, torch.Tensor, ChannelPlan]:
    torch.manual_seed(0)
    model, x = ResidualCNN().eval(), torch.randn(2, 1, 12, 12)
    return model, x, prunekit.plan(model, prunekit.ChannelConfig(ratio=ratio), x)


def test_plan_does_not_mutate_and_summarises() -> None:
    model, x, plan = _planned()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    plan2 = prunekit.plan(model, prunekit.ChannelConfig(ratio=0.5), x)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    text = plan.summary()
    assert "groups" in text and "params" in text and "FLOPs" in text
    assert plan2.keep == plan.keep


def test_plan_json_round_trip_replays(tmp_path: Path) -> None:
    model, x, plan = _planned()
    path = plan.save(tmp_path / "plan.json")
    loaded = ChannelPlan.load(path)
    assert loaded.keep == plan.keep and loaded.config == plan.config
    a = plan.apply(copy.deepcopy(model))
    b = loaded.apply(copy.deepcopy(model))
    torch.testing.assert_close(run(a, x), run(b, x))


def test_save_load_into_fresh_dense_model(tmp_path: Path) -> None:
    model, x, plan = _planned()
    pruned = plan.apply(model)
    prunekit.save(pruned, tmp_path / "m.safetensors", plan=plan)
    raw = (tmp_path / "m.safetensors").read_bytes()
    assert b"channel_plan" in raw and b"pickle" not in raw[:16]
    reloaded = prunekit.load(tmp_path / "m.safetensors", lambda: ResidualCNN())
    torch.testing.assert_close(run(reloaded.eval(), x), run(pruned, x))
    assert reloaded.conv1.out_channels == pruned.conv1.out_channels < 16


def test_apply_twice_fails_and_leaves_model_unchanged() -> None:
    model, x, plan = _planned()
    plan.apply(model)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(prunekit.PlanError, match="already pruned"):
        plan.apply(model)
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())


def test_apply_rolls_back_on_failure() -> None:
    model, x, plan = _planned()
    doc = plan.to_dict()
    doc["tensors"]["head.weight"] = {"shape": [10, 16], "keep": {"1": [0, 1, 2]}}
    doc["tensors"]["no.such.weight"] = {"shape": [3], "keep": {"0": [0]}}
    bad = ChannelPlan.from_dict(json.loads(json.dumps(doc)))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(prunekit.PlanError, match="no.such.weight"):
        bad.apply(model)
    assert {k: v.shape for k, v in model.state_dict().items()} == {k: v.shape for k, v in before.items()}
    assert model.conv1.out_channels == 16


def test_recipe_round_trip(tmp_path: Path) -> None:
    cfg = prunekit.ChannelConfig(ratio=0.3, criterion="l2", scope="global", round_to=4, exclude=["head"])
    prunekit.save_recipe(cfg, tmp_path / "r.yaml")
    assert prunekit.load_recipe(tmp_path / "r.yaml") == cfg


def test_prune_verb_dispatches() -> None:
    ctor, make_input = ZOO["concat_cnn"]
    model, x = ctor().eval(), make_input()
    out = prunekit.prune(model, prunekit.ChannelConfig(ratio=0.5), example_inputs=x)
    assert out is model and model.a.out_channels == 4 and run(model, x).shape == (2, 5)
