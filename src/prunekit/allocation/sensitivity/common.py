"""What the layer scan and the channel-group scan share: the evaluate contract and the checkpoint.

Both scanners measure one cell ("unit@level") at a time through `ScanCheckpoint.measure`, so a
killed scan resumes where it stopped, and both run the user's `evaluate` through
`call_evaluate`, which turns an exception or a non-finite metric into a recorded failure.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from typing import Any

from torch import nn

from prunekit.errors import SensitivityError
from prunekit.storage.runstate import Checkpointer, check_same_run, rng_state, set_rng_state

log = logging.getLogger(__name__)

Evaluate = Callable[[nn.Module], float]


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
    """

    def __init__(self, saver: Checkpointer | None = None, run: dict[str, Any] | None = None) -> None:
        self.saver = saver or Checkpointer(None, "sensitivity")
        self.run = run or {}
        self.cells: dict[str, Any] = {}
        self._rng: dict[str, Any] | None = None
        self._new = 0
        saved = self.saver.load()
        if saved is not None:
            check_same_run(saved["run"], self.run, "sensitivity")
            self.cells, self._rng = saved["cells"], saved["rng"]

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

    def finish(self) -> None:
        """Save every cell (the finished scan resumes instantly)."""
        if self._new:
            self._save()

    def _save(self) -> None:
        self.saver.save({"run": self.run, "cells": self.cells, "rng": rng_state()})
