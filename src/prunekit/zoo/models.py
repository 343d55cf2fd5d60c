"""Small reference models used by the demo, tests and benchmarks."""

from __future__ import annotations

from torch import nn


def lenet_300_100(num_classes: int = 10) -> nn.Sequential:
    """The 784-300-100-10 MLP of LeCun et al. 1998, the pruning field's classic testbed
    (Han et al. 2015 prune it 12x). Takes (N, 1, 28, 28) or (N, 784) inputs."""
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(784, 300),
        nn.ReLU(),
        nn.Linear(300, 100),
        nn.ReLU(),
        nn.Linear(100, num_classes),
    )
