"""Entry points for the torchrun recipe tests: a tiny MLP and calibration batches, as a user's package has.

`tests/distributed/test_recipe_ranks.py` runs one recipe naming these in one process and under
`torchrun --nproc_per_node 2 -m prunekit prune`, and compares the saved models.
"""

from __future__ import annotations

import torch
from torch import nn


def build_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(12, 32), nn.ReLU(), nn.Linear(32, 16), nn.ReLU(), nn.Linear(16, 3))


def calibration_batches() -> list[torch.Tensor]:
    """Five batches: under two ranks, rank 0 calibrates on batches 0, 2, 4 and rank 1 on 1, 3."""
    g = torch.Generator().manual_seed(1)
    return [torch.randn(8, 12, generator=g) * (1 + i) for i in range(5)]
