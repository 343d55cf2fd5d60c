"""N:M config, mask math, planner, validator, gradual N:M and bad input."""

from __future__ import annotations

import logging

import pytest
import torch
from torch import nn

import prunekit as pk
from prunekit.errors import ConfigError, PlanError
from prunekit.methods.nm import NMConfig, check_nm, nm_mask
from tests.models import ZOO, mlp

PATTERNS = [(2, 4), (4, 8), (1, 4)]


@pytest.mark.parametrize(("n", "m"), PATTERNS)
@pytest.mark.parametrize("shape", [(6, 16), (5, 8, 3, 3)])
def test_nm_mask_keeps_exactly_n_largest_per_group(n: int, m: int, shape: tuple[int, ...]) -> None:
    scores = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    keep = nm_mask(scores, n, m)
    groups = keep.movedim(1, -1).reshape(-1, m) if keep.dim() > 2 else keep.reshape(-1, m)
    assert (groups.sum(dim=1) == n).all()
    s = scores.movedim(1, -1).reshape(-1, m) if scores.dim() > 2 else scores.reshape(-1, m)
    kept_min = s.masked_fill(~groups, float("inf")).min(dim=1).values
    dropped_max = s.masked_fill(groups, float("-inf")).max(dim=1).values
    assert (kept_min >= dropped_max).all()


def test_nm_config_validates_n_below_m_and_criterion() -> None:
    with pytest.raises(ConfigError, match="n < m"):
        NMConfig(n=4, m=4)
    with pytest.raises(ConfigError, match="unknown criterion"):
        NMConfig(n=2, m=4, criterion="nope")
    with pytest.raises(ConfigError, match="typo"):
        NMConfig(n=2, m=4, typo=1)
    assert NMConfig(n=2, m=4).target_sparsity == 0.5


def test_nm_recipe_round_trip(tmp_path) -> None:
    cfg = pk.PerLayer({"re:.*2": NMConfig(n=1, m=4, criterion="wanda"), "_default": NMConfig(n=4, m=8)})
    path = pk.save_recipe(cfg, tmp_path / "r.yaml")
    assert pk.load_recipe(path) == cfg


@pytest.mark.parametrize(("n", "m"), PATTERNS)
def test_prune_holds_pattern_and_finalize_matches(n: int, m: int) -> None:
    torch.manual_seed(0)
    model = mlp()  # 64 -> 32 -> 16 -> 4: every input dim divides by 4 and 8
    x = torch.randn(3, 1, 8, 8)
    pk.prune(model, NMConfig(n=n, m=m))
    report = check_nm(model, n, m)
    assert report.ok and set(report.groups) == {"1", "3", "5"}
    assert float(pk.sparsity(model)) == pytest.approx(1 - n / m)
    masked = model(x)
    torch.testing.assert_close(pk.finalize(model)(x), masked)
    assert check_nm(model, n, m).ok


def test_check_nm_reports_violations_per_layer() -> None:
    report = check_nm(mlp(), 2, 4)
    assert not report.ok and report.violations["1"] == 32 * 16
    assert "violations" in str(report)


def test_indivisible_layer_is_skipped_by_name_and_left_dense(caplog) -> None:
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 4))
    with caplog.at_level(logging.WARNING, logger="prunekit.methods.nm"):
        plan = pk.plan(model, NMConfig(n=2, m=4))
    assert "'0'" in caplog.text and "skipped" in caplog.text
    assert set(plan.masks) == {"2.weight"} and "0" in plan.skipped and "skipped 0" in plan.summary()
    plan.apply(model)
    assert pk.sparsity(model).layers == {"0": 0.0, "2": 0.5}
    assert check_nm(model, 2, 4).skipped == {"0": "input dim 6 not a multiple of 4"}
    with pytest.raises(ConfigError, match="layer '0'.*not a multiple of m=4"):
        pk.plan(model, NMConfig(n=2, m=4, indivisible="error"))


def test_nan_weight_names_the_layer() -> None:
    model = mlp()
    with torch.no_grad():
        model[3].weight[0, 0] = float("nan")
    with pytest.raises(PlanError, match="'3'"):
        pk.prune(model, NMConfig(n=2, m=4))
    assert pk.sparsity(model).total == 0.0  # nothing applied


def test_per_layer_mixes_nm_and_unstructured() -> None:
    model = ZOO["attention"][0]()
    cfg = pk.PerLayer({"re:fc.*": NMConfig(n=2, m=4), "head": None, "_default": pk.UnstructuredConfig(sparsity=0.3)})
    pk.prune(model, cfg)
    assert check_nm(model, 2, 4, layers=["fc1", "fc2"]).ok
    assert pk.sparsity(model).layers["head"] == 0.0


def test_with_sparsity_walks_kept_count_down() -> None:
    cfg = NMConfig(n=2, m=8)
    assert [cfg.with_sparsity(s).n for s in (0.01, 0.125, 0.3, 0.75)] == [7, 7, 5, 2]
    with pytest.raises(ConfigError, match="cannot reach"):
        cfg.with_sparsity(0.9)


def test_gradual_pruner_moves_from_dense_to_nm_monotonically() -> None:
    torch.manual_seed(0)
    model = mlp()
    pruner = pk.GradualPruner(model, NMConfig(n=2, m=8), pk.Cubic(end_step=8, every=2))
    modules = dict(model.named_modules())
    previous = {k: torch.ones_like(modules[k].weight, dtype=torch.bool) for k in ("1", "3", "5")}
    kept_counts = []
    for step in range(10):
        with torch.no_grad():  # a training step moves the weights between updates
            for p in model.parameters():
                p.add_(0.01 * torch.randn_like(p))
        pruner.step(step)
        masks = pk.core.masks.mask_state_dict(model)
        for fqn, old in previous.items():
            new = masks[f"{fqn}.weight"]
            assert not (new & ~old).any()  # pruned weights never come back
            previous[fqn] = new
        kept_counts.append(int(masks["1.weight"].reshape(-1, 8).sum(dim=1).max()))
    assert kept_counts[0] == 8 and kept_counts[-1] == 2
    assert kept_counts == sorted(kept_counts, reverse=True) and len(set(kept_counts)) > 2
    assert check_nm(model, 2, 8).ok


def test_gradual_skip_is_warned_once_per_layer(caplog) -> None:
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 4))
    pruner = pk.GradualPruner(model, NMConfig(n=1, m=4), pk.Cubic(end_step=6))
    with caplog.at_level(logging.WARNING, logger="prunekit.methods.nm"):
        for step in range(7):
            pruner.step(step)
    assert sum("'0' skipped" in r.getMessage() for r in caplog.records) == 1
    assert pk.sparsity(model).layers["0"] == 0.0 and check_nm(model, 1, 4).violations["2"] == 0
