"""Block-sparse config, mask math, planner (magnitude and Wanda), checker, schedules, I/O."""

from __future__ import annotations

import logging

import pytest
import torch
from torch import nn

import prunekit as pk
from prunekit.errors import ConfigError, PlanError
from prunekit.methods.block import BlockConfig, block_mask, block_scores, check_blocks
from prunekit.methods.nm import NMConfig, check_nm
from tests.models import ZOO, mlp

BLOCKS = [(1, 4), (4, 4), (2, 8)]


def _tiles(mask: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    m = mask.reshape(mask.shape[0], -1).float()
    return m.reshape(m.shape[0] // block[0], block[0], m.shape[1] // block[1], block[1]).mean(dim=(1, 3))


@pytest.mark.parametrize("block", BLOCKS)
@pytest.mark.parametrize("shape", [(16, 32), (8, 4, 2, 2)])
@pytest.mark.parametrize("sparsity", [0.25, 0.5, 0.9])
def test_block_mask_prunes_whole_lowest_tiles(block, shape, sparsity) -> None:
    scores = torch.rand(shape, generator=torch.Generator().manual_seed(0))
    keep = block_mask(scores, sparsity, block)
    tiles = _tiles(keep, block)
    assert ((tiles == 0) | (tiles == 1)).all()  # whole tiles only
    assert int((tiles == 0).sum()) == round(sparsity * tiles.numel())
    means = block_scores(scores, block)
    assert means[tiles == 1].min() >= means[tiles == 0].max()


def test_block_scores_keep_fully_pruned_tiles_pruned() -> None:
    s = torch.tensor([[float("-inf"), float("-inf"), float("-inf"), 3.0]])
    assert block_scores(s, (1, 2)).tolist() == [[float("-inf"), 1.5]]


def test_config_validates_fields() -> None:
    with pytest.raises(ConfigError, match="block"):
        BlockConfig(sparsity=0.5, block=(0, 4))
    with pytest.raises(ConfigError, match="sparsity"):
        BlockConfig(sparsity=1.0)
    with pytest.raises(ConfigError, match="unknown criterion"):
        BlockConfig(sparsity=0.5, criterion="nope")
    with pytest.raises(ConfigError, match="typo"):
        BlockConfig(sparsity=0.5, typo=1)
    assert BlockConfig(sparsity=0.5).with_sparsity(0.2) == BlockConfig(sparsity=0.2)


def test_recipe_round_trip(tmp_path) -> None:
    cfg = pk.PerLayer({"re:.*2": BlockConfig(sparsity=0.7, block=(4, 16), criterion="wanda", scope="global"),
                       "_default": BlockConfig(sparsity=0.5, exclude=("x",))})
    for suffix in ("yaml", "json"):
        assert pk.load_recipe(pk.save_recipe(cfg, tmp_path / f"r.{suffix}")) == cfg


@pytest.mark.parametrize("block", BLOCKS)
def test_prune_blocks_and_finalize_matches(block) -> None:
    torch.manual_seed(0)
    model, x = mlp(), torch.randn(3, 1, 8, 8)
    pk.prune(model, BlockConfig(sparsity=0.75, block=block))
    report = check_blocks(model, block)
    assert report.zero_fraction == {"1": 0.75, "3": 0.75, "5": 0.75}
    assert not any(report.partial_blocks.values())
    masked = model(x)
    torch.testing.assert_close(pk.finalize(model)(x), masked)
    assert check_blocks(model, block).zero_fraction["3"] == 0.75


@pytest.mark.parametrize("name", sorted(ZOO))
def test_every_zoo_model_gets_whole_blocks_and_finalize_matches(name) -> None:
    torch.manual_seed(0)
    build, inputs = ZOO[name]
    model, x = build().eval(), inputs()
    pk.prune(model, BlockConfig(sparsity=0.5, block=(2, 2)))
    report = check_blocks(model, (2, 2))
    assert report.blocks and not any(report.partial_blocks.values())
    assert all(f == pytest.approx(0.5, abs=0.5 / report.blocks[k]) for k, f in report.zero_fraction.items())
    masked = model(x)
    torch.testing.assert_close(pk.finalize(model)(x), masked)


def test_global_scope_ranks_blocks_across_layers() -> None:
    torch.manual_seed(0)
    model = mlp()
    with torch.no_grad():
        model[3].weight.mul_(100.0)  # layer "3" holds the largest blocks: global keeps it dense
    pk.prune(model, BlockConfig(sparsity=0.5, block=(4, 4), scope="global"))
    fractions = check_blocks(model, (4, 4)).zero_fraction
    assert fractions["3"] == 0.0 and fractions["1"] > 0.5
    assert float(pk.sparsity(model)) == pytest.approx(0.5, abs=16 / 2624)


def test_check_blocks_counts_partial_tiles_of_an_unstructured_mask() -> None:
    torch.manual_seed(0)
    model = pk.prune(mlp(), pk.UnstructuredConfig(sparsity=0.5, scope="layer"))
    report = check_blocks(model, (4, 4))
    assert report.partial_blocks["1"] > 0 and report.zero_fraction["1"] < 0.5
    assert "all-zero" in str(report)


def test_indivisible_layer_is_skipped_by_name_or_raises(caplog) -> None:
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 4))
    with caplog.at_level(logging.WARNING, logger="prunekit.methods.block"):
        plan = pk.plan(model, BlockConfig(sparsity=0.5, block=(4, 4)))
    assert "'0' skipped" in caplog.text
    assert set(plan.masks) == {"2.weight"} and "skipped 0" in plan.summary()
    plan.apply(model)
    assert pk.sparsity(model).layers == {"0": 0.0, "2": 0.5}
    assert "0" in check_blocks(model, (4, 4)).skipped
    with pytest.raises(ConfigError, match=r"layer '0'.*\(8, 6\).*4x4"):
        pk.plan(model, BlockConfig(sparsity=0.5, block=(4, 4), indivisible="error"))
    with pytest.raises(PlanError, match="no layer"):
        pk.plan(nn.Linear(6, 6), BlockConfig(sparsity=0.5, block=(4, 4)))


@pytest.mark.parametrize("scope", ["layer", "global"])
def test_nan_weight_names_the_layer_and_nothing_is_applied(scope) -> None:
    model = mlp()
    with torch.no_grad():
        model[3].weight[0, 0] = float("nan")
    with pytest.raises(PlanError, match="'3'"):
        pk.prune(model, BlockConfig(sparsity=0.5, block=(4, 4), scope=scope))
    assert not pk.core.masks.masked_modules(model)


def test_per_layer_mixes_block_nm_and_dense() -> None:
    model = ZOO["attention"][0]()
    cfg = pk.PerLayer({"fc1": BlockConfig(sparsity=0.5, block=(4, 4)), "fc2": NMConfig(n=2, m=4), "head": None,
                       "_default": pk.UnstructuredConfig(sparsity=0.3)})
    pk.prune(model, cfg)
    report = check_blocks(model, (4, 4), layers=["fc1"])
    assert report.zero_fraction == {"fc1": 0.5} and report.partial_blocks == {"fc1": 0}
    assert check_nm(model, 2, 4, layers=["fc2"]).ok and pk.sparsity(model).layers["head"] == 0.0


def test_gradual_pruner_ramps_blocks_and_never_revives() -> None:
    torch.manual_seed(0)
    model = mlp()
    pruner = pk.GradualPruner(model, BlockConfig(sparsity=0.75, block=(4, 4)), pk.Cubic(end_step=8, every=2))
    previous = torch.ones(32, 64, dtype=torch.bool)
    fractions = []
    for step in range(10):
        with torch.no_grad():  # a training step moves the weights between updates
            for p in model.parameters():
                p.add_(0.05 * torch.randn_like(p))
        pruner.step(step)
        mask = pk.core.masks.mask_state_dict(model)["1.weight"]
        assert not (mask & ~previous).any()
        previous = mask
        report = check_blocks(model, (4, 4))
        assert not any(report.partial_blocks.values())
        fractions.append(report.zero_fraction["1"])
    assert fractions[0] == 0.0 and fractions[-1] == 0.75
    assert fractions == sorted(fractions) and len(set(fractions)) > 2


def _scaled_batches() -> list[torch.Tensor]:
    # Inputs with a few loud features, so Wanda's |W| * ||X_j|| ranks blocks unlike |W|.
    gen = torch.Generator().manual_seed(1)
    scale = torch.ones(64)
    scale[:8] = 20.0
    return [(torch.randn(8, 64, generator=gen) * scale).reshape(8, 1, 8, 8) for _ in range(2)]


@pytest.mark.parametrize("scope", ["layer", "global"])
def test_wanda_scores_blocks_by_weight_times_activation_norm(scope) -> None:
    torch.manual_seed(0)
    model, batches = mlp(), _scaled_batches()
    plan = pk.plan(model, BlockConfig(sparsity=0.5, block=(4, 4), criterion="wanda", scope=scope), data=batches)
    x = torch.cat(batches).reshape(-1, 64)
    expected = model[1].weight.detach().abs() * x.pow(2).sum(dim=0).sqrt()
    if scope == "layer":  # the first layer sees the dense inputs either way
        torch.testing.assert_close(plan.masks["1.weight"], block_mask(expected, 0.5, (4, 4)))
    assert plan.masks["1.weight"].ne(block_mask(model[1].weight.abs(), 0.5, (4, 4))).any()
    plan.apply(model)
    assert not any(check_blocks(model, (4, 4)).partial_blocks.values())
    assert float(pk.sparsity(model)) == pytest.approx(0.5, abs=16 / 2624)


def test_weight_updating_criterion_and_missing_data_are_refused() -> None:
    with pytest.raises(ConfigError, match="sparsegpt"):
        pk.plan(mlp(), BlockConfig(sparsity=0.5, block=(4, 4), criterion="sparsegpt"), data=_scaled_batches())
    with pytest.raises(pk.CalibrationError, match="calibration data"):
        pk.plan(mlp(), BlockConfig(sparsity=0.5, block=(4, 4), criterion="wanda"))


def test_save_load_round_trip_keeps_blocks_and_outputs(tmp_path) -> None:
    torch.manual_seed(0)
    model, x = mlp(), torch.randn(2, 1, 8, 8)
    pk.prune(model, BlockConfig(sparsity=0.75, block=(2, 8)))
    pk.save(model, tmp_path / "m.safetensors")
    target = pk.prune(mlp(), BlockConfig(sparsity=0.5, block=(2, 8)))  # masked, other weights
    pk.load(tmp_path / "m.safetensors", target)
    torch.testing.assert_close(target(x), model(x))
    assert check_blocks(target, (2, 8)).zero_fraction == {"1": 0.75, "3": 0.75, "5": 0.75}
