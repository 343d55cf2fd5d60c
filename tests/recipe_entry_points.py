"""Entry points used by the recipe tests: a tiny model and loaders, as a user's package would have."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset


def build_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(12, 32), nn.ReLU(), nn.Linear(32, 3))


def loaders() -> tuple[DataLoader, DataLoader]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(256, 12, generator=g)
    y = x[:, :3].argmax(1)
    return DataLoader(TensorDataset(x, y), batch_size=32, shuffle=True, generator=g), DataLoader(
        TensorDataset(x, y), batch_size=64)


def broken() -> nn.Module:
    raise RuntimeError("no GPU here")
