"""Memory budgets: estimate what a pass will hold, and refuse up front (`max_memory`).

A calibration pass (Wanda, SparseGPT) or a sensitivity scan that runs out of memory is killed
by the OS after minutes or hours, with nothing said. With `max_memory` the pass first adds up
what it will hold at its peak (the model, copies it keeps to restore, SparseGPT's d x d fp32
Hessians, one block's calibration activations) and raises `MemoryBudgetError` with the
estimate and the budget if it does not fit. The estimate counts the dominant terms, not every
temporary, so leave some headroom.

`max_memory` is a byte count (int) or a string with a unit: "4GB", "1.5 GiB", "512MB"
(KB/MB/GB/TB are powers of 1000, KiB/MiB/GiB/TiB powers of 1024), as accelerate's
`max_memory` takes them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from torch import Tensor, nn

from prunekit.errors import ConfigError, MemoryBudgetError

MemorySize = int | str

_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]i?b|b)?\s*$", re.IGNORECASE)


def parse_memory(value: MemorySize | None, where: str = "max_memory") -> int | None:
    """Bytes in `value` (an int, or a string like "4GB"); None stays None (no budget).

    Raises:
        ConfigError: not a positive int or a number with a known unit; names `where`.
    """
    if value is None:
        return None
    if isinstance(value, int) and not isinstance(value, bool):
        if value <= 0:
            raise ConfigError(f"{where}: {value!r} must be a positive number of bytes")
        return value
    match = _SIZE.match(value) if isinstance(value, str) else None
    if match is None:
        raise ConfigError(f"{where}: {value!r} is not a memory size; use bytes (an int) or a string such as "
                          "'4GB', '1.5GiB' or '512MB'")
    size = int(float(match.group(1)) * _UNITS[(match.group(2) or "").lower()])
    if size <= 0:
        raise ConfigError(f"{where}: {value!r} must be more than 0 bytes")
    return size


def format_bytes(n: float) -> str:
    """`n` bytes as "1.23 GB" (powers of 1000, the units `parse_memory` reads back)."""
    for unit, size in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= size:
            return f"{n / size:.3g} {unit}"
    return f"{int(n)} B"


@dataclass(frozen=True)
class MemoryEstimate:
    """The bytes a pass will hold at its peak, by component ("model", "hessians", ...)."""

    what: str
    parts: dict[str, int]

    @property
    def total(self) -> int:
        return sum(self.parts.values())

    def summary(self) -> str:
        shown = ", ".join(f"{name} {format_bytes(b)}" for name, b in self.parts.items() if b)
        return f"{self.what}: about {format_bytes(self.total)} ({shown})"

    def __str__(self) -> str:
        return self.summary()


def check_budget(estimate: MemoryEstimate, max_memory: MemorySize | None, hint: str) -> None:
    """Raise `MemoryBudgetError` when `estimate` exceeds `max_memory` (None: no budget)."""
    budget = parse_memory(max_memory)
    if budget is not None and estimate.total > budget:
        raise MemoryBudgetError(f"{estimate.summary()} exceeds max_memory {format_bytes(budget)} "
                                f"({budget:,} bytes); nothing was run. {hint}")


# --------------------------------------------------------------------------------------------
# What the passes hold.


def model_bytes(model: nn.Module) -> int:
    """Bytes of the model's parameters and buffers (shared tensors counted once)."""
    seen = {id(t): t for t in [*model.parameters(), *model.buffers()]}
    return sum(t.numel() * t.element_size() for t in seen.values())


def data_bytes(value: Any) -> int:
    """Bytes of the tensors in a batch (a tensor, or tuples/lists/dicts of them, nested)."""
    if isinstance(value, Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, dict):
        return sum(data_bytes(v) for v in value.values())
    if isinstance(value, (tuple, list)):
        return sum(data_bytes(v) for v in value)
    return 0


def layer_work(weight: Tensor, hessian: bool, updates_weights: bool) -> tuple[int, int, int]:
    """(kept for restore and the plan, solver scratch, statistics) bytes of one Linear layer."""
    out_f, in_f = weight.shape[0], weight.shape[1]
    numel = out_f * in_f
    # The runner keeps the old weight to restore, the plan keeps a bool mask (and new weights).
    kept = numel * weight.element_size() + numel + (numel * weight.element_size() if updates_weights else 0)
    # fp32 working copies of the weight (clone, solved weight, error/quantised blocks).
    scratch = 3 * numel * 4
    stats = in_f * 4
    if hessian:
        # X^T X is held per layer; solving one layer briefly holds 8 more d x d fp32 matrices
        # (H = 2 X^T X / n, its working copy, the damping identity and its scaled copy, the
        # damped H, its Cholesky factor, the inverse and the inverse's factor): measured peak
        # RSS growth for d = 4096 was 8.9 d^2 x 4 bytes.
        stats += in_f * in_f * 4
        scratch += 8 * in_f * in_f * 4
    return kept, scratch, stats
