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
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
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


def _layer_work(weight: Tensor, hessian: bool, updates_weights: bool) -> tuple[int, int, int]:
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


def calibration_estimate(
    model: nn.Module,
    fqns: Sequence[str],
    batches: Sequence[Any],
    solver: Any,
    block_input_bytes: int = 0,
    blocks: Sequence[str] = (),
) -> MemoryEstimate:
    """Peak bytes of a calibration pass over `fqns` (Linear layers) with `solver`.

    Statistics (sum of squares per input; SparseGPT's fp32 d x d Hessians) are held for one
    block at a time when the model has repeated `blocks`, else for all layers at once;
    `block_input_bytes` is one batch's input to a block (held for every batch, twice while
    the block's outputs are computed).
    """
    modules = dict(model.named_modules())
    kept = scratch = 0
    per_block: dict[str, int] = {}
    for fqn in fqns:
        k, s, st = _layer_work(modules[fqn].weight, solver.hessian, solver.updates_weights)  # type: ignore[arg-type]
        kept, scratch = kept + k, max(scratch, s)
        owner = next((b for b in blocks if fqn.startswith(b + ".")), "")
        per_block[owner] = per_block.get(owner, 0) + st
    parts = {
        "model": model_bytes(model),
        "calibration batches": sum(data_bytes(b) for b in batches),
        "block activations": 2 * block_input_bytes * len(batches),
        "weights kept to restore + plan": kept,
        "hessians" if solver.hessian else "statistics": max(per_block.values(), default=0),
        "solver scratch": scratch,
    }
    return MemoryEstimate(f"{solver.name} calibration of {len(fqns)} layers", parts)


def check_calibration_memory(
    model: nn.Module, fqns: list[str], batches: list[Any], solver: Any, max_memory: MemorySize | None
) -> None:
    """Refuse a calibration pass that would exceed `max_memory`, before any statistic is taken."""
    if max_memory is None:
        return
    from prunekit.calibration import _inputs_to, find_blocks

    blocks = find_blocks(model, fqns)
    block_input = 0
    if blocks:  # one batch run only as far as block 0: what each captured batch will cost
        with torch.no_grad():
            captured = _inputs_to(model, blocks[0][1], batches[0])
        block_input = data_bytes(list(captured)) if captured is not None else 0
    estimate = calibration_estimate(model, fqns, batches, solver, block_input, [b for b, _ in blocks or []])
    check_budget(estimate, max_memory, "Use fewer or shorter calibration batches, fewer layers per pass "
                 "(exclude some), or a larger max_memory.")


def sensitivity_estimate(model: nn.Module, config: Any, data: Any = None) -> MemoryEstimate:
    """Peak bytes of a sensitivity scan of `config` over `model`.

    Mask configs prune one layer in place and keep its weight and mask to restore (plus, for
    a calibration criterion, that layer's calibration pass); channel configs prune a copy of
    the whole model per probe.
    """
    from prunekit.config import MaskConfig, PerLayer
    from prunekit.targets import resolve

    parts = {"model": model_bytes(model)}
    if not isinstance(config, (MaskConfig, PerLayer)):
        parts["pruned copy per probe"] = model_bytes(model)
        if getattr(config, "criterion", None) == "taylor":  # scored from one gradient per tensor
            parts["gradients"] = sum(p.numel() * 4 for p in model.parameters())
        return MemoryEstimate(f"sensitivity scan ({type(config).__name__})", parts)
    chosen = resolve(model, config)
    modules = dict(model.named_modules())
    probe = calib = 0
    for fqn, leaf in chosen.items():
        weight = modules[fqn].weight
        numel = weight.numel()  # type: ignore[union-attr]
        # restore copy + fp32 scores + bool mask (+ a mask copy when the layer is already masked)
        probe = max(probe, numel * weight.element_size() + numel * 4 + 2 * numel)  # type: ignore[union-attr]
        criterion = getattr(leaf, "criterion", None)
        if criterion is not None and data is not None:
            from prunekit.calibration import _SOLVERS

            solver = _SOLVERS.get(criterion)
            if solver is not None:
                kept, scratch, stats = _layer_work(weight, solver.hessian, solver.updates_weights)  # type: ignore[arg-type]
                calib = max(calib, kept + scratch + stats)
    parts["layer probe (restore copy, scores, mask)"] = probe
    if calib:
        parts["calibration of one layer"] = calib
        batches = data if isinstance(data, (list, tuple)) else []
        parts["calibration batches"] = sum(data_bytes(b) for b in batches)
    return MemoryEstimate(f"sensitivity scan of {len(chosen)} layers", parts)


def check_sensitivity_memory(model: nn.Module, config: Any, data: Any, max_memory: MemorySize | None) -> None:
    """Refuse a sensitivity scan that would exceed `max_memory`, before the first evaluation."""
    if max_memory is None:
        return
    check_budget(sensitivity_estimate(model, config, data), max_memory,
                 "Scan fewer layers (exclude some), use a proxy metric on fewer batches, or a larger max_memory.")
