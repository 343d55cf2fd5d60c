"""The verbs: plan never mutates, prune is all-or-nothing, and rules resolve by FQN or regex."""

from __future__ import annotations

import sys

import pytest
import torch
from torch import nn

import prunekit as pk
from prunekit.core.masks import masked_modules


def _mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4))


def test_plan_does_not_mutate() -> None:
    model = _mlp()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    plan = pk.plan(model, pk.UnstructuredConfig(sparsity=0.5))
    assert set(plan.masks) == {"0.weight", "2.weight", "4.weight"}
    assert "total" in plan.summary()
    assert not masked_modules(model)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])


def test_per_layer_first_match_wins_and_none_stays_dense() -> None:
    model = _mlp()
    cfg = pk.PerLayer({"4": None, "re:[0-9]": pk.UnstructuredConfig(sparsity=0.5, scope="layer"),
                       "_default": pk.UnstructuredConfig(sparsity=0.9)})
    pk.prune(model, cfg)
    layers = pk.sparsity(model).layers
    assert layers["4"] == 0.0
    assert layers["0"] == pytest.approx(0.5, abs=1e-3) and layers["2"] == pytest.approx(0.5, abs=1e-3)


def test_default_rule_applies_to_unmatched_layers() -> None:
    model = _mlp()
    pk.prune(model, pk.PerLayer({"0": None, "_default": pk.UnstructuredConfig(sparsity=0.25, scope="layer")}))
    layers = pk.sparsity(model).layers
    assert layers["0"] == 0.0 and layers["2"] == pytest.approx(0.25, abs=1e-3)


@pytest.mark.parametrize(
    ("config", "needle"),
    [
        (pk.PerLayer({"re:.*attn.*": None, "_default": pk.UnstructuredConfig(sparsity=0.5)}), "re:.*attn.*"),
        (pk.PerLayer({"fc9": pk.UnstructuredConfig(sparsity=0.5)}), "fc9"),
        (pk.UnstructuredConfig(sparsity=0.5, exclude=("classifier",)), "classifier"),
        (pk.UnstructuredConfig(sparsity=0.5, exclude=("re:.*",)), "no layer"),
    ],
)
def test_rules_that_match_nothing_fail_loudly(config, needle: str) -> None:
    model = _mlp()
    with pytest.raises(pk.ConfigError, match=needle):
        pk.prune(model, config)
    assert not masked_modules(model)


def test_exclude_leaves_layer_dense() -> None:
    model = pk.prune(_mlp(), pk.UnstructuredConfig(sparsity=0.5, exclude=("4",)))
    assert pk.sparsity(model).layers["4"] == 0.0


def test_model_without_prunable_layers() -> None:
    with pytest.raises(pk.UnsupportedLayerError, match="ReLU"):
        pk.prune(nn.ReLU(), pk.UnstructuredConfig(sparsity=0.5))


def test_apply_is_all_or_nothing() -> None:
    model = _mlp()
    plan = pk.plan(model, pk.UnstructuredConfig(sparsity=0.5))
    plan.masks["4.weight"] = plan.masks["4.weight"][:2]  # wrong shape for the last layer
    with pytest.raises(pk.PlanError, match="4.weight"):
        plan.apply(model)
    assert not masked_modules(model)


def test_apply_rolls_back_when_attaching_fails(monkeypatch) -> None:
    # `prunekit.plan` the attribute is the verb; the module is reached through sys.modules.
    plan_module = sys.modules["prunekit.core.plan"]
    model = _mlp()
    plan = pk.plan(model, pk.UnstructuredConfig(sparsity=0.5))
    calls = {"n": 0}
    real = plan_module.set_mask

    def flaky(module, mask, name="weight"):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("disk on fire")
        real(module, mask, name)

    monkeypatch.setattr(plan_module, "set_mask", flaky)
    with pytest.raises(pk.PlanError, match="rolled back"):
        plan.apply(model)
    assert not masked_modules(model)


def test_random_criterion_is_seeded() -> None:
    a = pk.plan(_mlp(), pk.UnstructuredConfig(sparsity=0.5, criterion="random", seed=3))
    b = pk.plan(_mlp(), pk.UnstructuredConfig(sparsity=0.5, criterion="random", seed=3))
    assert all(torch.equal(a.masks[k], b.masks[k]) for k in a.masks)


def test_unknown_config_type_names_known_methods() -> None:
    with pytest.raises(pk.ConfigError, match="UnstructuredConfig"):
        pk.prune(_mlp(), pk.Cubic(end_step=3))


def test_global_pruning_warns_when_it_empties_a_layer() -> None:
    model = _mlp()
    with torch.no_grad():
        model[4].weight.mul_(1e-6)
    with pytest.warns(UserWarning, match="4.weight"):
        pk.prune(model, pk.UnstructuredConfig(sparsity=0.9))
