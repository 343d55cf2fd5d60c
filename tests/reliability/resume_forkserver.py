"""Imported once by the kill tests' forkserver: what every child would otherwise load itself.

The children are forked from it, so each starts with torch, prunekit, optuna and the runners
imported but no run state. `gc.freeze()` keeps those objects out of the children's garbage
collections, which would otherwise touch (and so copy) every page of the inherited heap.
"""

from __future__ import annotations

import gc

import optuna  # noqa: F401
import pytest  # noqa: F401
import torch

from tests.reliability import resume_runs  # noqa: F401

torch.manual_seed(0)  # its first call imports torch._dynamo
torch.use_deterministic_algorithms(False)  # its first call imports torch._inductor (seconds)
gc.collect()
gc.freeze()
