"""A user's own models and data as recipe entry points: scikit-learn's handwritten digits (real, offline).

The recipes beside this file name these functions as `examples.recipes.digits:<function>`; run
them from the repository root with `python -m prunekit prune --recipe examples/recipes/<name>.yaml`.
The models train here in a few seconds (seeded), as a user's entry point would load trained weights.
"""

from __future__ import annotations

import torch
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

_EPOCHS = 12


def _split() -> tuple[TensorDataset, TensorDataset]:
    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0  # (1797, 1, 8, 8) in [0, 1]
    y = torch.tensor(digits.target)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    train, held_out = order[:1437], order[1437:]
    return TensorDataset(x[train], y[train]), TensorDataset(x[held_out], y[held_out])


def loaders() -> tuple[DataLoader, DataLoader]:
    """Data entry point: (train, eval) loaders, 1,437 / 360 digits."""
    train, held_out = _split()
    return (DataLoader(train, batch_size=64, shuffle=True, generator=torch.Generator().manual_seed(0)),
            DataLoader(held_out, batch_size=120))


def _trained(model: nn.Module) -> nn.Module:
    torch.manual_seed(0)
    train, _ = loaders()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(_EPOCHS):
        for x, y in train:
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
    return model.eval()


def cnn() -> nn.Module:
    """Model entry point: a small conv net (conv-BN-ReLU x2, pooled, linear head), trained."""
    torch.manual_seed(0)
    return _trained(nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                                  nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
                                  nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(128, 10)))


def mlp() -> nn.Module:
    """Model entry point: an MLP 64-256-256-10 on the flattened digits, trained."""
    torch.manual_seed(0)
    return _trained(nn.Sequential(nn.Flatten(), nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(),
                                  nn.Linear(256, 10)))
