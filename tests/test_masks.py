"""Mask math hits the requested sparsity exactly, and finalize keeps outputs identical."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import prunekit as pk
from prunekit.core.masks import global_topk_masks, topk_mask
from tests.models import ZOO


@pytest.mark.parametrize("sparsity", [0.0, 0.1, 0.5, 0.9, 0.999])
@pytest.mark.parametrize("shape", [(7,), (13, 11), (4, 3, 3, 3)])
def test_topk_mask_exact_count(sparsity: float, shape: tuple[int, ...]) -> None:
    scores = torch.randn(shape)
    mask = topk_mask(scores, sparsity)
    assert mask.shape == scores.shape
    # nearest count, except that a sparsity below 1 always keeps one element (tiny layers)
    assert int((~mask).sum()) == min(round(sparsity * scores.numel()), scores.numel() - 1)
    if mask.any() and (~mask).any():  # every kept score beats every pruned one
        assert scores[mask].min() >= scores[~mask].max()


def test_global_masks_rank_across_tensors() -> None:
    scores = {"a": torch.full((10,), 5.0), "b": torch.arange(10.0) - 10}
    masks = global_topk_masks(scores, 0.5)
    assert masks["a"].all() and int(masks["b"].sum()) == 0


@pytest.mark.parametrize("name", list(ZOO))
@pytest.mark.parametrize("scope", ["global", "layer"])
def test_prune_hits_sparsity_and_finalize_keeps_outputs(name: str, scope: str) -> None:
    build, example = ZOO[name]
    torch.manual_seed(0)
    model, x = build().eval(), example()
    pk.prune(model, pk.UnstructuredConfig(sparsity=0.6, scope=scope))
    report = pk.sparsity(model)
    if scope == "layer":
        for layer, s in report.layers.items():
            numel = report.numel[layer]
            assert abs(s * numel - round(0.6 * numel)) <= 1, layer
    else:
        assert abs(report.zeros - round(0.6 * report.total_numel)) <= len(report.layers)
    masked_out = model(x)
    pk.finalize(model)
    assert not any("parametrizations" in k for k in model.state_dict())
    torch.testing.assert_close(model(x), masked_out, rtol=0, atol=0)


def test_masks_survive_optimizer_steps() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(20, 20), nn.ReLU(), nn.Linear(20, 2))
    pk.prune(model, pk.UnstructuredConfig(sparsity=0.7))
    zeros_before = [(m.weight == 0).clone() for m in (model[0], model[2])]
    opt = torch.optim.AdamW(model.parameters(), lr=0.1, weight_decay=0.1)
    for _ in range(5):
        loss = model(torch.randn(8, 20)).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    for zeros, layer in zip(zeros_before, (model[0], model[2]), strict=True):
        assert (layer.weight[zeros] == 0).all()
        assert (layer.weight[~zeros] != 0).all()


def test_straight_through_masks_keep_weights_dead_but_pass_gradients() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(20, 20), nn.ReLU(), nn.Linear(20, 2))
    pruner = pk.GradualPruner(model, pk.UnstructuredConfig(sparsity=0.7), pk.OneShot(), straight_through=True)
    pruner.step(0)
    dead = model[0].weight == 0
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(3):
        loss = model(torch.randn(8, 20)).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        original = model[0].parametrizations.weight.original
        assert (original.grad[dead] != 0).any()  # the estimator passes gradients through
        opt.step()
    assert (model[0].weight[dead] == 0).all()


def test_sparsity_report_str_lists_layers() -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
    text = str(pk.sparsity(pk.prune(model, pk.UnstructuredConfig(sparsity=0.5))))
    assert "0" in text and "1" in text and "total" in text


def test_finalize_is_noop_on_dense_model() -> None:
    model = nn.Linear(3, 3)
    before = copy.deepcopy(model.state_dict())
    pk.finalize(model)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])


def test_mask_update_in_place_is_seen_by_forward() -> None:
    layer = nn.Linear(6, 6)
    pk.prune(layer, pk.UnstructuredConfig(sparsity=0.5))
    x = torch.randn(2, 6)
    layer(x)  # fills the cached dense mask
    from prunekit.core.masks import get_mask

    get_mask(layer).mask.zero_()
    torch.testing.assert_close(layer(x), layer.bias.expand(2, 6))


def test_finalizing_a_deep_copy_leaves_the_original_masked_and_working() -> None:
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
    pk.prune(model, pk.UnstructuredConfig(sparsity=0.5))
    x = torch.randn(3, 8)
    before = model(x)
    copy_ = pk.finalize(copy.deepcopy(model))
    assert torch.equal(model(x), before) and torch.equal(copy_(x), before)
    assert pk.sparsity(model).total == pytest.approx(0.5, abs=0.02)
