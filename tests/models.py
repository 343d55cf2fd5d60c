"""Tiny real architectures shared by the tests: each one exercises a coupling pattern."""

from __future__ import annotations

import torch
from torch import Tensor, nn


def mlp() -> nn.Module:
    """Flatten into a stack of Linear layers."""
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 16), nn.ReLU(), nn.Linear(16, 4))


class ResidualCNN(nn.Module):
    """Conv-BN-ReLU stem, one residual block (an add couples channels), pooled Linear head."""

    def __init__(self, width: int = 16, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU())
        self.conv1 = nn.Conv2d(width, width, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(width)
        self.head = nn.Linear(width, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.stem(x)
        y = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(x + self.bn2(self.conv2(y)))
        return self.head(x.mean(dim=(2, 3)))


class ConcatCNN(nn.Module):
    """Two branches concatenated on channels, then a 1x1 conv and a flatten-into-Linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.b = nn.Conv2d(3, 6, 1)
        self.mix = nn.Conv2d(14, 10, 1)
        self.head = nn.Linear(10 * 4 * 4, 5)

    def forward(self, x: Tensor) -> Tensor:
        x = torch.cat([torch.relu(self.a(x)), torch.relu(self.b(x))], dim=1)
        x = nn.functional.adaptive_avg_pool2d(torch.relu(self.mix(x)), 4)
        return self.head(torch.flatten(x, 1))


class DepthwiseCNN(nn.Module):
    """MobileNet-style depthwise-separable block with a grouped conv."""

    def __init__(self) -> None:
        super().__init__()
        self.pw1 = nn.Conv2d(3, 16, 1)
        self.bn1 = nn.BatchNorm2d(16)
        self.dw = nn.Conv2d(16, 16, 3, padding=1, groups=16)
        self.bn2 = nn.BatchNorm2d(16)
        self.grouped = nn.Conv2d(16, 16, 3, padding=1, groups=4)
        self.pw2 = nn.Conv2d(16, 8, 1)
        self.head = nn.Linear(8, 3)

    def forward(self, x: Tensor) -> Tensor:
        x = torch.relu(self.bn1(self.pw1(x)))
        x = torch.relu(self.bn2(self.dw(x)))
        x = torch.relu(self.pw2(torch.relu(self.grouped(x))))
        return self.head(x.mean(dim=(2, 3)))


class TinyAttention(nn.Module):
    """Pre-norm transformer block: nn.MultiheadAttention plus an MLP, both residual."""

    def __init__(self, dim: int = 32, heads: int = 4) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.norm2 = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, 4 * dim)
        self.fc2 = nn.Linear(4 * dim, dim)
        self.head = nn.Linear(dim, 3)

    def forward(self, x: Tensor) -> Tensor:
        h = self.norm1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        x = x + self.fc2(torch.relu(self.fc1(self.norm2(x))))
        return self.head(x.mean(dim=1))


# name -> (constructor, example input)
ZOO = {
    "mlp": (mlp, lambda: torch.randn(2, 1, 8, 8)),
    "residual_cnn": (ResidualCNN, lambda: torch.randn(2, 1, 12, 12)),
    "concat_cnn": (ConcatCNN, lambda: torch.randn(2, 3, 8, 8)),
    "depthwise_cnn": (DepthwiseCNN, lambda: torch.randn(2, 3, 8, 8)),
    "attention": (TinyAttention, lambda: torch.randn(2, 5, 32)),
}
