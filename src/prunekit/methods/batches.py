"""Calibration data: validated batches, and under torchrun each rank's own.

A batch is what the model is called with: a tensor, a tuple/list of positional arguments or a
dict of keyword arguments. Calibration criteria (Wanda, SparseGPT, OWL, structured importance)
all read their data through `rank_batches`, so bad data fails the same way everywhere.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

from prunekit.core.collectives import collective_guard
from prunekit.core.distributed import all_reduce_sum, rank_and_world
from prunekit.errors import CalibrationError

Batch = Any  # a Tensor, a tuple/list of positional args, or a dict of keyword args


def as_batches(data: Iterable[Batch] | Tensor | None) -> list[Batch]:
    """Materialise calibration data as a list of batches, validating each one.

    A bare tensor is taken as one batch (not iterated row by row).

    Raises:
        CalibrationError: no data, no batches, an empty batch, or a batch of another type.
    """
    if data is None:
        raise CalibrationError("this criterion needs calibration data: pass data=[batch, ...]")
    batches = [data] if isinstance(data, Tensor) else list(data)
    if not batches:
        raise CalibrationError("calibration data is empty: pass at least one batch")
    for i, batch in enumerate(batches):
        if isinstance(batch, dict):
            tensors = [v for v in batch.values() if isinstance(v, Tensor)]
        elif isinstance(batch, (tuple, list)):
            tensors = [v for v in batch if isinstance(v, Tensor)]
        elif isinstance(batch, Tensor):
            tensors = [batch]
        else:
            raise CalibrationError(
                f"calibration batch {i} is a {type(batch).__name__}; use a tensor, a tuple of "
                "positional arguments or a dict of keyword arguments"
            )
        if not tensors or any(t.numel() == 0 for t in tensors):
            raise CalibrationError(f"calibration batch {i} is empty (no elements)")
    return batches


def rank_batches(data: Iterable[Batch] | Tensor | None) -> list[Batch]:
    """`as_batches` on this rank's calibration data; under torchrun every rank must have some.

    Raises:
        CalibrationError: as `as_batches`; under torchrun, naming every rank that has no batches
            (all ranks raise together, so none waits in a collective for the others).
    """
    rank, world = rank_and_world()
    if world == 1:
        return as_batches(data)
    try:
        batches, error = as_batches(data), None
    except CalibrationError as err:
        batches, error = [], err
    counts = torch.zeros(world, dtype=torch.int64)
    counts[rank] = len(batches) if error is None else -1  # -1: this rank's data was refused
    with collective_guard("all_reduce", "calibration: counting each rank's batches"):
        counts = all_reduce_sum(counts)
    refused = [r for r, n in enumerate(counts.tolist()) if n <= 0]
    if refused:
        raise CalibrationError(f"rank(s) {refused} of {world} have no usable calibration data; under torchrun "
                               f"every rank calibrates on its own batches (rank {rank}: {error or 'has data'})")
    return batches
