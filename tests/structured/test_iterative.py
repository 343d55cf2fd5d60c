"""Iterative structured pruning with fine-tuning and distillation; the BN-scale regulariser."""

from __future__ import annotations

import pytest
import torch

import prunekit
from prunekit.train.iterative import prune_iteratively
from tests.models import ResidualCNN


def test_rounds_reach_the_ratio_and_train() -> None:
    torch.manual_seed(0)
    model, x = ResidualCNN(), torch.randn(4, 1, 8, 8)
    loader = [(torch.randn(8, 1, 8, 8), torch.randint(0, 10, (8,))) for _ in range(2)]
    teacher = ResidualCNN()
    seen = []
    model, plans = prune_iteratively(
        model,
        prunekit.ChannelConfig(ratio=0.5),
        x,
        loader,
        rounds=2,
        teacher=teacher,
        callback=lambda r, m, p: seen.append((r, m.conv1.out_channels)),
    )
    assert len(plans) == 2 and [r for r, _ in seen] == [0, 1]
    assert model.conv1.out_channels == 9  # 16 -> 13 -> 9 (29 % per round, floor)
    assert model(x).shape == (4, 10)


def test_rounds_must_be_positive() -> None:
    with pytest.raises(prunekit.ConfigError, match="rounds"):
        prune_iteratively(ResidualCNN(), prunekit.ChannelConfig(ratio=0.5), None, [], rounds=0)


def test_bn_scale_penalty_is_l1_of_gammas() -> None:
    model = ResidualCNN()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.fill_(-2.0)
    penalty = prunekit.bn_scale_penalty(model, 0.1)
    assert penalty.item() == pytest.approx(0.1 * 2.0 * 16 * 3)
    penalty.backward()
    assert model.bn1.weight.grad is not None
    with pytest.raises(prunekit.ConfigError, match="BatchNorm"):
        prunekit.bn_scale_penalty(torch.nn.Linear(2, 2))
