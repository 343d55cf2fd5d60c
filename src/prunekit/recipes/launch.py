"""Runs under `torchrun`: the process group the CLI and the recipe runner start from torchrun's environment.

`torchrun --nproc_per_node N -m prunekit prune --recipe R.yaml --out D` starts N processes with
RANK, WORLD_SIZE, LOCAL_RANK and MASTER_ADDR/PORT set. `torchrun_process_group` starts the group
they describe (gloo on CPU; NCCL, one GPU per local rank, when CUDA is available), with a
timeout on every collective, and ends it when the run ends: a barrier first on success, so no
rank tears down while another still talks to it; none on failure, so a failing rank exits and
torchrun stops the others instead of leaving them waiting.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta

import torch
import torch.distributed as dist

from prunekit.core.collectives import TIMEOUT_ENV, collective_guard
from prunekit.core.distributed import in_process_group
from prunekit.errors import CollectiveError, ConfigError, PrunekitError

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT_S = 1800.0  # generous: a rank may calibrate or evaluate for minutes between collectives


def launched_world() -> tuple[int, int]:
    """(rank, world size) that torchrun's environment gives this process; (0, 1) without torchrun.

    Read from RANK and WORLD_SIZE, so it holds before a process group starts and after it ends.

    Raises:
        ConfigError: RANK or WORLD_SIZE is not a valid integer.
    """
    try:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
    except ValueError:
        raise ConfigError(f"torchrun environment: RANK={os.environ.get('RANK')!r} and WORLD_SIZE="
                          f"{os.environ.get('WORLD_SIZE')!r} must be integers") from None
    if world < 1 or not 0 <= rank < world:
        raise ConfigError(f"torchrun environment: RANK={rank} is not a rank of WORLD_SIZE={world}")
    return rank, world


def collective_timeout_s(timeout_s: float | None = None) -> float:
    """Seconds a collective may wait for the other ranks: `timeout_s`, else $PRUNEKIT_COLLECTIVE_TIMEOUT_S, else 1800.

    Raises:
        ConfigError: the value is not a positive finite number of seconds.
    """
    raw: object = timeout_s if timeout_s is not None else os.environ.get(TIMEOUT_ENV, DEFAULT_TIMEOUT_S)
    try:
        value = float(raw)  # type: ignore[arg-type]
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise ConfigError(f"collective timeout ({TIMEOUT_ENV} or timeout_s) must be a positive number of seconds, "
                          f"got {raw!r}")
    return value


def refuse_under_torchrun(step: str, why: str) -> None:
    """Raise if this process is one of several torchrun started: `step` cannot run distributed.

    Raises:
        ConfigError: WORLD_SIZE > 1 or a process group of more than one rank is running; the
            message names `step`, says `why`, and how to run it instead.
    """
    if launched_world()[1] > 1 or in_process_group():
        raise ConfigError(f"{step} cannot run under torchrun ({why}); it would run once per process. Run it in "
                          "one process (python -m prunekit ..., without torchrun)")


@contextmanager
def torchrun_process_group(timeout_s: float | None = None) -> Iterator[bool]:
    """Start the process group torchrun's environment describes, if none runs yet, and end it after the block.

    Without torchrun (WORLD_SIZE unset or 1), or when a group is already running (the caller's
    own, kept as it is), it does nothing. Yields whether it started a group.

    Args:
        timeout_s: seconds any collective may wait (see `collective_timeout_s`).

    Raises:
        ConfigError: a bad timeout or torchrun environment.
        PrunekitError: the group cannot start, or the closing barrier fails or times out
            (names the rank and the operation).
    """
    rank, world = launched_world()
    if world == 1 or (dist.is_available() and dist.is_initialized()):
        yield False
        return
    timeout = timedelta(seconds=collective_timeout_s(timeout_s))
    nccl = torch.cuda.is_available()
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    if nccl:
        torch.cuda.set_device(local_rank)  # one GPU per process, as NCCL needs
    try:
        dist.init_process_group("nccl" if nccl else "gloo", timeout=timeout)
    except (RuntimeError, ValueError) as err:
        raise PrunekitError(f"rank {rank} of {world}: cannot start the torchrun process group "
                            f"({'nccl' if nccl else 'gloo'}): {err}") from err
    log.info("rank %d of %d: %s process group, collective timeout %s", rank, world, dist.get_backend(), timeout)
    finished = False
    try:
        yield True
        finished = True
    finally:
        try:
            if finished:
                with collective_guard("barrier", "end of run (before the process group is destroyed)"):
                    dist.barrier(device_ids=[local_rank] if nccl else None)
        finally:
            dist.destroy_process_group()


def _collective_failure(err: RuntimeError) -> bool:
    """Whether `err` is a backend's collective failure (gloo raises a bare RuntimeError)."""
    if isinstance(err, dist.DistError):
        return True
    text = str(err)
    return any(mark in text for mark in ("Timed out", "timed out", "gloo", "NCCL", "Connection closed",
                                         "Connection reset", "Broken pipe"))


@contextmanager
def recipe_step(step: str) -> Iterator[None]:
    """Name the rank and `step` when a collective inside the block (prunekit's or the user's) fails.

    Under a process group of more than one rank, a backend failure (a timeout, a peer gone) is
    re-raised as a `CollectiveError` naming the rank, the step and the operation as far as the
    backend's message tells it; every other error passes through unchanged.

    Raises:
        CollectiveError: a collective inside the block failed or timed out.
    """
    try:
        yield
    except RuntimeError as err:
        if not in_process_group() or not _collective_failure(err):
            raise
        rank, world = dist.get_rank(), dist.get_world_size()
        raise CollectiveError(
            f"rank {rank} of {world}: a collective failed during recipe step {step!r} (operation: see the "
            f"backend's message): {err}. Another rank did not reach it in time (it failed, was killed or "
            f"hangs); the timeout is {TIMEOUT_ENV} seconds"
        ) from err
