"""Per-layer sensitivity: prune one layer at a time at several levels and measure the damage.

The scan of Han et al. 2015 ("Learning both weights and connections for efficient neural
networks", Fig. 5) and of Li et al. 2017 ("Pruning filters for efficient ConvNets", Sec. 3.3):
each layer (or, with a `ChannelConfig`, each coupled channel group) is pruned alone at each
level, the user's `evaluate(model)` scores it, and the layer is restored before the next one.
The resulting `SensitivityTable` (`table.py`) feeds `prunekit.allocate`, which prunes the least
sensitive layers hardest.

Mask configs are restored exactly (the layer's previous mask and stored weight are put back);
structured configs change shapes, so each probe runs on a copy of the model.

This package holds the public entry points and dispatches on the config's type: `layers.py`
scans mask layers (and estimates a scan's memory), `groups.py` scans channel groups,
`replaced.py` factorizes one layer at a time on a copy (`LowRankConfig`: the level is the share
of the layer's weights removed, so `allocate` picks per-layer ranks), `common.py` holds what they
share (the evaluate contract, the resumable cell checkpoint), and `ranks.py` splits a scan across
torchrun ranks: each measures its share of the cells, and the ranks merge them (no pickle) into
the table one process would build, identical on every rank.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn

from prunekit.allocation.sensitivity.common import Evaluate, ScanCheckpoint, call_evaluate, scan_checkpoint
from prunekit.allocation.sensitivity.groups import scan_groups
from prunekit.allocation.sensitivity.layers import (
    check_sensitivity_memory,
    layer_flops,
    scan_layers,
    sensitivity_estimate,
)
from prunekit.allocation.sensitivity.replaced import scan_replaced_layers
from prunekit.allocation.sensitivity.table import SensitivityTable
from prunekit.config import FrozenConfig, MaskConfig, PerLayer, config_to_dict
from prunekit.core.memory import parse_memory
from prunekit.core.tracking import Tracker, track
from prunekit.errors import ConfigError, SensitivityError
from prunekit.structured.lowrank import LowRankConfig

__all__ = [
    "Evaluate",
    "ScanCheckpoint",
    "SensitivityError",
    "SensitivityTable",
    "call_evaluate",
    "check_sensitivity_memory",
    "layer_flops",
    "proxy_loss",
    "sensitivity",
    "sensitivity_estimate",
]


# --------------------------------------------------------------------------------------------
# Evaluate functions.


def proxy_loss(
    batches: Iterable[tuple[Any, Tensor]],
    *,
    n_batches: int = 4,
    loss_fn: Callable[[Tensor, Tensor], Tensor] | None = None,
) -> Evaluate:
    """The cheap proxy metric: mean loss on the first `n_batches` batches (lower is better).

    The batches are taken once and reused for every probe, so all probes see the same data.
    Use it with `higher_is_better=False` on models too large to evaluate fully per probe.

    Example:
        >>> x, y = torch.randn(8, 4), torch.randint(0, 2, (8,))
        >>> evaluate = proxy_loss([(x, y)], n_batches=1)
        >>> evaluate(nn.Linear(4, 2)) > 0
        True
    """
    if n_batches < 1:
        raise ConfigError(f"proxy_loss: n_batches must be >= 1, got {n_batches}")
    fixed = []
    for i, batch in enumerate(batches):
        if i >= n_batches:
            break
        fixed.append(batch)
    if not fixed:
        raise ConfigError("proxy_loss: the batches iterable is empty")
    fn = loss_fn or nn.functional.cross_entropy

    @torch.no_grad()
    def evaluate(model: nn.Module) -> float:
        model.eval()
        total = sum(float(fn(model(x), y)) * len(y) for x, y in fixed)
        return total / sum(len(y) for _, y in fixed)

    return evaluate


# --------------------------------------------------------------------------------------------
# The scan.


def sensitivity(
    model: nn.Module,
    config: FrozenConfig,
    evaluate: Evaluate,
    levels: Sequence[float] = (0.5, 0.7, 0.8, 0.9, 0.95),
    *,
    higher_is_better: bool = True,
    example_inputs: Any = None,
    data: Iterable[Any] | None = None,
    on_error: Literal["continue", "stop"] = "continue",
    progress: bool = False,
    checkpoint_dir: str | Path | None = None,
    checkpoint_every: int = 1,
    resume: bool = False,
    max_memory: int | str | None = None,
    tracker: Tracker | None = None,
) -> SensitivityTable:
    """Prune each layer alone at each level and record `evaluate(model)`; the model ends unchanged.

    Args:
        model: the trained model. It is pruned and restored in place, one probe at a time.
        config: the config family, e.g. `UnstructuredConfig(sparsity=0.5, criterion="l1")`;
            its `exclude` and (for `PerLayer`) its dense rules pick which layers are scanned,
            and each probe replaces its sparsity by the level. A `ChannelConfig` scans
            coupled channel groups instead (needs `example_inputs`).
        evaluate: model -> metric, e.g. accuracy on a validation subset, or `proxy_loss(...)`.
        levels: sparsities (or channel ratios) to probe, each in [0, 1).
        higher_is_better: True for accuracy-like metrics, False for loss or perplexity.
        example_inputs: inputs to count per-layer FLOPs (for FLOPs targets) and to trace.
        data: calibration batches for criteria that need activations (Wanda, SparseGPT).
        on_error: when `evaluate` raises or returns NaN/inf, "continue" records NaN and the
            reason in `failures` (and logs it), "stop" raises `SensitivityError`.
        progress: show a tqdm bar over the probes.
        checkpoint_dir: folder for `sensitivity.ckpt.safetensors`: the cells measured so far
            and the RNG states, written atomically every `checkpoint_every` cells. None: none.
            Under torchrun each rank writes its own cells to `sensitivity.rank<r>.ckpt.safetensors`.
        checkpoint_every: measured cells (one `evaluate` each) between checkpoints.
        resume: continue from the checkpoints in `checkpoint_dir`: cells already in any of them
            are not measured again, so the table equals an uninterrupted scan's (a scan killed
            on N processes may resume on M).
        max_memory: memory budget in bytes or as "4GB"/"512MiB": the scan's peak (model, the
            copies it restores from, a calibration pass per probe) is estimated first, and
            `MemoryBudgetError` is raised before any probe when it would not fit.
        tracker: a `prunekit.core.tracking.Tracker`; the finished table is logged to it (rank 0):
            "sensitivity/<unit>" at step = the level in percent (the level's index if two levels
            round to one percent), failed cells left out, and "sensitivity.baseline" at step 0.

    Under torchrun (a process group of more than one rank) the scan is a collective: every
    rank measures the baseline, then unit cell i (units in order, each at every level) only on
    rank i % world; the ranks then merge their cells, and each returns the same table, equal to
    one process's for an `evaluate` that does not depend on the rank or on random draws.

    Returns:
        A `SensitivityTable` (save it as JSON, plot it, or pass it to `prunekit.allocate`).

    Raises:
        ConfigError: a level is outside [0, 1) or the config cannot vary its level.
        SensitivityError: the baseline cannot be evaluated, a probe failed with on_error="stop",
            or (under torchrun) another rank's share failed.
        PrunekitError: under torchrun, merging the ranks' cells failed or timed out (the
            message names the rank, the step and the collective).

    Example:
        >>> model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
        >>> from prunekit.methods.unstructured import UnstructuredConfig
        >>> t = sensitivity(model, UnstructuredConfig(sparsity=0.5), lambda m: 1.0, levels=[0.5])
        >>> t.units
        ['0', '2']
    """
    levels = [float(lv) for lv in levels]
    bad = [lv for lv in levels if not 0.0 <= lv < 1.0]
    if not levels or bad:
        raise ConfigError(f"sensitivity: levels must be a non-empty list in [0, 1), got bad {bad or levels}")
    if on_error not in ("continue", "stop"):
        raise ConfigError(f"sensitivity: on_error must be 'continue' or 'stop', got {on_error!r}")
    parse_memory(max_memory)
    check_sensitivity_memory(model, config, data, max_memory)
    # a mask config (or PerLayer of them) scans layers in place, a low-rank config factorizes
    # each layer on a copy; anything else is a channel config, or scan_groups names what it is not
    if isinstance(config, LowRankConfig) or (isinstance(config, PerLayer) and any(
            isinstance(v, LowRankConfig) for v in config.rules.values())):
        scan = scan_replaced_layers
    else:
        scan = scan_layers if isinstance(config, (MaskConfig, PerLayer)) else scan_groups
    training = model.training  # evaluate functions switch to eval mode; give the caller's back
    try:
        table = scan(model, config, evaluate, levels, higher_is_better=higher_is_better,
                     example_inputs=example_inputs, data=data, on_error=on_error, progress=progress,
                     cells=scan_checkpoint(checkpoint_dir, checkpoint_every, resume,
                                           {"config": config_to_dict(config), "levels": levels,
                                            "higher_is_better": higher_is_better}))
    finally:
        model.train(training)
    _track_table(tracker, table)
    return table


def _track_table(tracker: Tracker | None, table: SensitivityTable) -> None:
    """Log each unit's metric per level (step: the level in percent) and the baseline to `tracker`."""
    steps = [round(100 * lv) for lv in table.levels]
    if len(set(steps)) < len(steps):  # levels closer than a percent: number them instead
        steps = list(range(len(steps)))
    track(tracker, {"sensitivity.baseline": table.baseline}, 0)
    for i, step in enumerate(steps):
        track(tracker, {f"sensitivity/{u}": table.values[u][i] for u in table.units
                        if math.isfinite(table.values[u][i])}, step)
