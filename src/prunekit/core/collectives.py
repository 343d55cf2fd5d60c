"""Collectives that name their failures, and plain data exchanged between ranks without pickle.

Work split across ranks (sensitivity cells, calibration batches) goes item i to rank i % world
(`share`). To merge, every rank sends the cells it holds to all others as a JSON
document in a uint8 tensor: an all_gather of the lengths, then of the padded bytes. Plain data,
never a pickle (`all_gather_object` unpickles whatever a peer sends). Python's JSON writes a
float as its shortest round-trip repr, so merged values are bit-identical to measured ones.

Every collective prunekit runs here goes through `collective_guard`, which turns a backend
failure (a peer that timed out, died or skipped the call) into a `CollectiveError` naming the
rank, the step and the operation.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from prunekit.core.distributed import collective_device, rank_and_world
from prunekit.errors import CollectiveError

T = TypeVar("T")

TIMEOUT_ENV = "PRUNEKIT_COLLECTIVE_TIMEOUT_S"


@contextmanager
def collective_guard(op: str, step: str) -> Iterator[None]:
    """Re-raise a failed collective inside the block as a `CollectiveError` naming rank, step and op.

    gloo raises a plain `RuntimeError` when a peer does not reach the collective within the
    process group's timeout (or its connection drops); NCCL raises `DistBackendError`, one of
    them. Only the collective call itself belongs in the block, so no other error is renamed.

    Args:
        op: the collective, e.g. "all_gather" or "barrier".
        step: where in the run, e.g. "sensitivity: merge after cell 7 of 12".

    Raises:
        CollectiveError: the collective failed or timed out.
    """
    try:
        yield
    except RuntimeError as err:
        rank, world = rank_and_world()
        raise CollectiveError(
            f"rank {rank} of {world}: collective {op!r} failed at step {step!r}: {err}. Another rank did not "
            f"reach the same collective in time (it failed, was killed, hangs or skipped it); the timeout is "
            f"the process group's (for the prunekit CLI, {TIMEOUT_ENV} seconds)"
        ) from err


def share(items: Sequence[T], rank: int, world: int) -> list[T]:
    """The items rank `rank` of `world` works on: item i goes to rank i % world."""
    return [item for i, item in enumerate(items) if i % world == rank]


def exchange_json(document: Any, step: str) -> list[Any]:
    """Every rank's JSON-able `document`, in rank order (a collective: call on every rank).

    Sent as UTF-8 bytes in uint8 tensors, so nothing a peer sends is executed on load; NaN and
    infinities travel as JSON's NaN/Infinity. In one process: `[document]`.

    Raises:
        CollectiveError: a collective failed or timed out (names rank, `step` and the operation).
    """
    rank, world = rank_and_world()
    if world == 1:
        return [document]
    device = collective_device(None)
    data = json.dumps(document, allow_nan=True).encode("utf-8")
    size = torch.tensor([len(data)], dtype=torch.int64, device=device)
    sizes = [torch.zeros_like(size) for _ in range(world)]
    with collective_guard("all_gather (document sizes)", step):
        dist.all_gather(sizes, size)
    longest = max(int(s.item()) for s in sizes)
    mine = torch.zeros(longest, dtype=torch.uint8)
    mine[: len(data)] = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    gathered = [torch.zeros(longest, dtype=torch.uint8, device=device) for _ in range(world)]
    with collective_guard("all_gather (documents)", step):
        dist.all_gather(gathered, mine.to(device))
    return [json.loads(bytes(g[: int(s.item())].cpu().numpy()).decode("utf-8"))
            for g, s in zip(gathered, sizes, strict=True)]
