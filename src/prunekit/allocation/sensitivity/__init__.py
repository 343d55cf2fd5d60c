"""Per-layer sensitivity: prune one layer at a time at several levels and measure the damage.

The scan of Han et al. 2015 ("Learning both weights and connections for efficient neural
networks", Fig. 5) and of Li et al. 2017 ("Pruning filters for efficient ConvNets", Sec. 3.3):
each layer (or, with a `ChannelConfig`, each coupled channel group) is pruned alone at each
level, the user's `evaluate(model)` scores it, and the layer is restored before the next one.
The resulting `SensitivityTable` (`sensitivity_table.py`) feeds `prunekit.allocate`, which prunes the least sensitive
layers hardest.

Mask configs are restored exactly (the layer's previous mask and stored weight are put back);
structured configs change shapes, so each probe runs on a copy of the model.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, Literal, cast

import torch
from torch import Tensor, nn

from prunekit.allocation.sensitivity.table import SensitivityTable
from prunekit.config import FrozenConfig, MaskConfig, PerLayer, config_to_dict
from prunekit.core.masks import base_tensor, get_mask
from prunekit.core.memory import (
    MemoryEstimate,
    MemorySize,
    check_budget,
    data_bytes,
    layer_work,
    model_bytes,
    parse_memory,
)
from prunekit.core.plan import MaskPlan, plan
from prunekit.core.targets import prunable_layers, resolve
from prunekit.errors import ConfigError, SensitivityError
from prunekit.methods.calibration import SOLVERS
from prunekit.storage.runstate import Checkpointer

log = logging.getLogger(__name__)

Evaluate = Callable[[nn.Module], float]


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
# Memory: the scan's peak, checked against `max_memory` before the first evaluation.


def sensitivity_estimate(model: nn.Module, config: Any, data: Any = None) -> MemoryEstimate:
    """Peak bytes of a sensitivity scan of `config` over `model`.

    Mask configs prune one layer in place and keep its weight and mask to restore (plus, for
    a calibration criterion, that layer's calibration pass); channel configs prune a copy of
    the whole model per probe.
    """
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
            solver = SOLVERS.find(criterion)
            if solver is not None:
                kept, scratch, stats = layer_work(weight, solver.hessian, solver.updates_weights)  # type: ignore[arg-type]
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


# --------------------------------------------------------------------------------------------
# The scan.


def _at_level(family: FrozenConfig, level: float) -> FrozenConfig:
    """`family` at one level: a mask config's sparsity, or a channel config's ratio."""
    if isinstance(family, MaskConfig):
        return family.with_sparsity(level)
    if "ratio" in type(family).model_fields:
        return family.model_copy(update={"ratio": level})
    raise ConfigError(f"{type(family).__name__} has no sparsity or ratio a sensitivity scan can vary")


def leaf_at_level(family: FrozenConfig, level: float) -> FrozenConfig:
    """`family` at `level` as a rule for one named layer.

    `exclude` is dropped (the rule's key already names the layer) and `scope` becomes "layer",
    so layers that happen to share a level are not ranked together.
    """
    leaf = _at_level(family, level)
    fields = type(leaf).model_fields
    if "exclude" in fields:
        leaf = leaf.model_copy(update={"exclude": ()})
    if "scope" in fields:
        leaf = leaf.model_copy(update={"scope": "layer"})
    return leaf


def _call_evaluate(evaluate: Evaluate, model: nn.Module) -> tuple[float, str | None]:
    """Run `evaluate`; (value, None) or (NaN, why) when it raised or gave no finite number."""
    try:
        value = float(evaluate(model))
    except Exception as err:  # the user's code: report it against the layer, not crash the scan
        return math.nan, f"{type(err).__name__}: {err}"
    if not math.isfinite(value):
        return math.nan, f"evaluate returned {value}"
    return value, None


class _LayerProbe:
    """Prune one mask layer at a level in place, then put back exactly the tensors that were there.

    The mask is multiplied into the stored weight (or copied into an existing mask) instead of
    attaching a parametrization, so the module's parameters, their order and identity (what an
    optimizer holds) never change.
    """

    def __init__(self, model: nn.Module, data: Iterable[Any] | None) -> None:
        self.model, self.data = model, data
        self.modules = dict(model.named_modules())

    def run(self, fqn: str, config: FrozenConfig, evaluate: Evaluate) -> tuple[float, str | None]:
        mask_plan = plan(self.model, PerLayer({fqn: config}), data=self.data)
        if not isinstance(mask_plan, MaskPlan):
            raise ConfigError(f"sensitivity: {type(config).__name__} does not give a mask plan")
        module, key = self.modules[fqn], f"{fqn}.weight"
        mask, new = mask_plan.masks[key], mask_plan.weights.get(key)
        existing = get_mask(module)
        base = base_tensor(module, "weight")
        saved_weight = base.detach().clone()
        saved_mask = None if existing is None else existing.mask.clone()
        training = self.model.training
        try:
            with torch.no_grad():
                if new is not None:
                    base.copy_(new)
                if existing is not None:
                    existing.mask.copy_(mask)
                else:
                    base.mul_(mask.to(base.dtype))
            return _call_evaluate(evaluate, self.model)
        finally:
            with torch.no_grad():
                base.copy_(saved_weight)
                if existing is not None:
                    existing.mask.copy_(saved_mask)  # type: ignore[arg-type]
            self.model.train(training)


def layer_flops(model: nn.Module, example_inputs: Any, fqns: Sequence[str]) -> dict[str, int]:
    """Dense forward FLOPs of each named Linear/Conv layer on `example_inputs` (2 per MAC).

    Counted from each layer's output size with forward hooks (no graph tracing), so it works
    on any model that runs: a conv costs 2 * (in/groups) * kernel elements per output.
    """
    from prunekit.core.inputs import run_with_hooks

    counts: dict[str, int] = {}

    def hook(fqn: str) -> Callable[..., None]:
        def record(module: nn.Module, _inputs: Any, output: Tensor) -> None:
            weight = cast(Tensor, module.weight)
            per_output = weight.numel() // weight.shape[0]
            counts[fqn] = counts.get(fqn, 0) + 2 * per_output * output.numel()

        return record

    run_with_hooks(model, example_inputs, {f: hook(f) for f in fqns})
    return {f: counts.get(f, 0) for f in fqns}


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
        checkpoint_every: measured cells (one `evaluate` each) between checkpoints.
        resume: continue from the checkpoint in `checkpoint_dir`: cells already in it are not
            measured again, so the table equals an uninterrupted scan's.
        max_memory: memory budget in bytes or as "4GB"/"512MiB": the scan's peak (model, the
            copies it restores from, a calibration pass per probe) is estimated first, and
            `MemoryBudgetError` is raised before any probe when it would not fit.

    Returns:
        A `SensitivityTable` (save it as JSON, plot it, or pass it to `prunekit.allocate`).

    Raises:
        ConfigError: a level is outside [0, 1) or the config cannot vary its level.
        SensitivityError: the baseline cannot be evaluated, or a probe failed with on_error="stop".

    Example:
        >>> model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
        >>> from prunekit.config import UnstructuredConfig
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
    scan = _scan_layers
    if not isinstance(config, (MaskConfig, PerLayer)):
        from prunekit.allocation.sensitivity.groups import scan_groups as scan
    training = model.training  # evaluate functions switch to eval mode; give the caller's back
    try:
        return scan(model, config, evaluate, levels, higher_is_better=higher_is_better,
                    example_inputs=example_inputs, data=data, on_error=on_error, progress=progress,
                    cells=ScanCheckpoint(Checkpointer(checkpoint_dir, "sensitivity", checkpoint_every, resume),
                                         {"config": config_to_dict(config), "levels": levels,
                                          "higher_is_better": higher_is_better}))
    finally:
        model.train(training)


def _scan_layers(
    model: nn.Module,
    config: FrozenConfig,
    evaluate: Evaluate,
    levels: list[float],
    *,
    higher_is_better: bool,
    example_inputs: Any,
    data: Iterable[Any] | None,
    on_error: str,
    progress: bool,
    cells: ScanCheckpoint | None = None,
) -> SensitivityTable:
    cells = cells or ScanCheckpoint()
    chosen = resolve(model, config)
    fqns = list(chosen)
    baseline, why = cells.measure("baseline", _call_evaluate, evaluate, model)
    if why is not None:
        raise SensitivityError(f"evaluate fails on the unpruned model ({why}); fix it before scanning")
    probe = _LayerProbe(model, data)
    values: dict[str, list[float]] = {f: [] for f in fqns}
    failures: dict[str, str] = {}
    for fqn, level in _progress([(f, lv) for f in fqns for lv in levels], progress):
        value, why = cells.measure(f"{fqn}@{level!r}", probe.run, fqn, leaf_at_level(chosen[fqn], level), evaluate)
        values[fqn].append(value)
        if why is not None:
            failures[f"{fqn}@{level:g}"] = why
            log.warning("sensitivity: layer %r at level %g: %s", fqn, level, why)
            if on_error == "stop":
                raise SensitivityError(f"layer {fqn!r} at level {level:g}: {why} (use on_error='continue' to skip)")
    layers = prunable_layers(model)
    params = {f: cast(Tensor, layers[f].weight).numel() for f in fqns}
    total = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    flops = layer_flops(model, example_inputs, fqns) if example_inputs is not None else None
    family = config if isinstance(config, MaskConfig) else chosen[fqns[0]]
    cells.finish()
    return SensitivityTable(
        fqns, levels, values, baseline, higher_is_better, config_to_dict(family), params, flops,
        total, None if flops is None else sum(flops.values()), failures, "layer",
    )


class ScanCheckpoint:
    """The cells of a scan measured so far ("unit@level" -> result), checkpointed as they come.

    A resumed scan takes cells from the checkpoint instead of measuring them again. Before its
    first new measurement it restores the RNG states saved with the last cell, so a metric
    that draws random numbers sees the draws an uninterrupted scan would have made.
    """

    def __init__(self, saver: Checkpointer | None = None, run: dict[str, Any] | None = None) -> None:
        from prunekit.storage.runstate import check_same_run

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
        from prunekit.storage.runstate import set_rng_state

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
        from prunekit.storage.runstate import rng_state

        self.saver.save({"run": self.run, "cells": self.cells, "rng": rng_state()})


def _progress(items: list[Any], enabled: bool) -> Iterable[Any]:
    if not enabled:
        return items
    from tqdm.auto import tqdm

    return tqdm(items, desc="sensitivity", leave=False)
