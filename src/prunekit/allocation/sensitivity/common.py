"""What the layer scan and the channel-group scan share: the evaluate contract and the checkpoint.

Both scanners measure one cell ("unit@level") at a time through `ScanCheckpoint.measure`, so a
killed scan resumes where it stopped, and both run the user's `evaluate` through
`call_evaluate`, which turns an exception or a non-finite metric into a recorded failure.

Under torchrun each rank measures only its share of the cells (`ScanCheckpoint.share`,
`ranks.py`), checkpoints them to its own file, and `ScanCheckpoint.run_share` merges every
rank's cells, so each rank builds the same table a single process would.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

from torch import nn

from prunekit.core.collectives import exchange_json, share
from prunekit.core.distributed import rank_and_world
from prunekit.errors import SensitivityError
from prunekit.storage.runstate import Checkpointer, check_same_run, rng_state, set_rng_state

log = logging.getLogger(__name__)

Evaluate = Callable[[nn.Module], float]
T = TypeVar("T")


def call_evaluate(evaluate: Evaluate, model: nn.Module) -> tuple[float, str | None]:
    """Run `evaluate` on `model` (does not mutate it itself); (value, None), or (NaN, why) when
    it raised or gave no finite number, so one bad probe is reported against its unit."""
    try:
        value = float(evaluate(model))
    except Exception as err:  # the user's code: report it against the layer, not crash the scan
        return math.nan, f"{type(err).__name__}: {err}"
    if not math.isfinite(value):
        return math.nan, f"evaluate returned {value}"
    return value, None


def measure_baseline(cells: ScanCheckpoint, evaluate: Evaluate, model: nn.Module) -> float:
    """The unpruned model's metric (checkpointed as cell "baseline"); a scan cannot start without it.

    Raises:
        SensitivityError: `evaluate` fails on the unpruned model.
    """
    baseline, why = cells.measure("baseline", call_evaluate, evaluate, model)
    if why is not None:
        raise SensitivityError(f"evaluate fails on the unpruned model ({why}); fix it before scanning")
    return float(baseline)


def record_failure(failures: dict[str, str], what: str, unit: str, level: float, why: str | None,
                   on_error: str) -> None:
    """Note a failed probe in `failures` (mutates it) and log it; with on_error="stop", raise.

    Args:
        what: "layer" or "group", for the message.

    Raises:
        SensitivityError: the probe failed and `on_error` is "stop".
    """
    if why is None:
        return
    failures[f"{unit}@{level:g}"] = why
    log.warning("sensitivity: %s %r at level %g: %s", what, unit, level, why)
    if on_error == "stop":
        raise SensitivityError(f"{what} {unit!r} at level {level:g}: {why} (use on_error='continue' to skip)")


class ScanCheckpoint:
    """The cells of a scan measured so far ("unit@level" -> result), checkpointed as they come.

    A resumed scan takes cells from the checkpoint instead of measuring them again. Before its
    first new measurement it restores the RNG states saved with the last cell, so a metric
    that draws random numbers sees the draws an uninterrupted scan would have made.

    Args:
        saver: this process's checkpoint file (under torchrun, one per rank: `scan_checkpoint`).
        run: the scan's settings; a checkpoint of other settings is refused.
        peers: other checkpoint files of the same scan (other ranks', or an earlier run's with
            another number of processes) whose cells count as done; their RNG states are not used.
    """

    def __init__(self, saver: Checkpointer | None = None, run: dict[str, Any] | None = None,
                 peers: Sequence[Checkpointer] = ()) -> None:
        self.saver = saver or Checkpointer(None, "sensitivity")
        self.run = run or {}
        self.cells: dict[str, Any] = {}
        self.rank, self.world = rank_and_world()
        self._rng: dict[str, Any] | None = None
        self._new = 0
        saved = self.saver.load()
        if saved is not None:
            check_same_run(saved["run"], self.run, f"sensitivity ({self.saver.path.name})")
            self.cells, self._rng = saved["cells"], saved["rng"]
        for peer in peers:
            done = peer.load()
            if done is not None:
                check_same_run(done["run"], self.run, f"sensitivity ({peer.path.name})")
                for key, value in done["cells"].items():
                    self.cells.setdefault(key, value)

    def share(self, items: Sequence[T]) -> list[T]:
        """The unit cells this rank measures: item i goes to rank i % world (all of them in one process)."""
        return share(items, self.rank, self.world)

    def measure(self, key: str, fn: Callable[..., Any], *args: Any) -> Any:
        """`fn(*args)`, or the result the checkpoint holds for `key`."""
        if key in self.cells:
            return self.cells[key]
        if self._rng is not None:
            set_rng_state(self._rng)
            self._rng = None
        result = self.cells[key] = fn(*args)
        self._new += 1
        if self.saver.due(self._new):
            self._save()
        return result

    def result(self, key: str) -> Any:
        """The measured result of cell `key` (after `run_share`, whichever rank measured it)."""
        return self.cells[key]

    def run_share(self, work: Callable[[], None], cells: int) -> None:
        """Run `work` (this rank's share, measured through `measure`), save, and merge every rank's cells.

        In one process: `work()` then `finish()`. Under torchrun a collective: every rank ends
        holding every rank's cells (a cell measured on several ranks keeps the lowest rank's
        value), and if `work` raised on any rank, every rank raises: that rank its own error,
        the others a `SensitivityError` naming it, so no rank waits for another in vain.

        Args:
            work: measures this rank's cells; it may stop early (on_error="stop").
            cells: how many unit cells the scan has, for the step named in a collective's error.

        Raises:
            SensitivityError: another rank's share failed.
            PrunekitError: the merge's collective failed or timed out (names rank, step, op).
        """
        if self.world == 1:
            work()
            self.finish()
            return
        error: Exception | None = None
        try:
            work()
        except Exception as err:  # re-raised below, once every rank knows
            error = err
        self.finish()  # this rank's cells are on disk before it waits for the others
        step = f"sensitivity merge after this rank measured its {len(self.share(range(cells)))} of {cells} cells"
        reason = None if error is None else f"{type(error).__name__}: {error}"
        documents = exchange_json({"cells": self.cells, "error": reason}, step)
        if error is not None:
            raise error
        failed = [(r, d["error"]) for r, d in enumerate(documents) if d["error"] is not None]
        if failed:
            rank, why = failed[0]
            raise SensitivityError(f"sensitivity: rank {rank} of {self.world} failed ({why}); every rank stops")
        merged: dict[str, Any] = {}
        for document in documents:
            for key, value in document["cells"].items():
                merged.setdefault(key, tuple(value) if isinstance(value, list) else value)
        self.cells = merged

    def finish(self) -> None:
        """Save every cell (the finished scan resumes instantly)."""
        if self._new:
            self._save()

    def _save(self) -> None:
        self.saver.save({"run": self.run, "cells": self.cells, "rng": rng_state()})


def scan_checkpoint(directory: str | Path | None, every: int, resume: bool, run: dict[str, Any]) -> ScanCheckpoint:
    """The cells of a scan with its checkpoint files in `directory` (None: kept in memory only).

    One process writes `sensitivity.ckpt.safetensors`; under torchrun rank r writes
    `sensitivity.rank<r>.ckpt.safetensors`, so ranks never write one file. On resume, every
    sensitivity checkpoint in the folder counts: a scan killed on N processes may resume on M.

    Raises:
        ConfigError: bad `every`, or `resume` without a directory.
        CheckpointError: a checkpoint exists without `resume`, or is of another run.
    """
    rank, world = rank_and_world()
    saver = Checkpointer(directory, "sensitivity" if world == 1 else f"sensitivity.rank{rank}", every, resume)
    peers: list[Checkpointer] = []
    if resume and directory is not None:  # not without resume: a peer's fresh file is no earlier run
        names = ["sensitivity"] + sorted(p.name.removesuffix(".ckpt.safetensors")
                                         for p in Path(directory).glob("sensitivity.rank*.ckpt.safetensors"))
        peers = [Checkpointer(directory, name, every, resume) for name in names if name != saver.name]
    return ScanCheckpoint(saver, run, peers)
