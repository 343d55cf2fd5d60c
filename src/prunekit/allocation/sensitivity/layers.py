"""The mask-config branch of `prunekit.sensitivity`: prune one layer in place, measure, restore.

Each probe prunes one named layer at one level and puts back exactly the tensors that were
there (Han et al. 2015, Fig. 5), so the model, its parameters and an optimizer's references to
them end unchanged. The scan's peak memory is estimated (and checked against a budget) here
too, for both branches, before the first evaluation.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any, cast

import torch
from torch import Tensor, nn

from prunekit.allocation.sensitivity.common import (
    Evaluate,
    ScanCheckpoint,
    call_evaluate,
    measure_baseline,
    record_failure,
)
from prunekit.allocation.sensitivity.table import SensitivityTable
from prunekit.config import FrozenConfig, MaskConfig, PerLayer, config_to_dict
from prunekit.core.inputs import run_with_hooks
from prunekit.core.masks import base_tensor, get_mask
from prunekit.core.memory import MemoryEstimate, MemorySize, check_budget, data_bytes, layer_work, model_bytes
from prunekit.core.plan import MaskPlan, plan
from prunekit.core.progress import progress as progress_bar
from prunekit.core.targets import prunable_layers, resolve
from prunekit.errors import ConfigError
from prunekit.methods.calibration import SOLVERS
from prunekit.structured.config import ChannelConfig

# --------------------------------------------------------------------------------------------
# Memory: the scan's peak, checked against `max_memory` before the first evaluation.


def sensitivity_estimate(model: nn.Module, config: Any, data: Any = None) -> MemoryEstimate:
    """Peak bytes of a sensitivity scan of `config` over `model` (reads the model, never mutates).

    Mask configs prune one layer in place and keep its weight and mask to restore (plus, for
    a calibration criterion, that layer's calibration pass); channel configs prune a copy of
    the whole model per probe.
    """
    parts = {"model": model_bytes(model)}
    if not isinstance(config, (MaskConfig, PerLayer)):
        parts["pruned copy per probe"] = model_bytes(model)
        if isinstance(config, ChannelConfig) and config.criterion == "taylor":  # one gradient per tensor
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
        # not every mask config is scored by a named criterion (a custom MaskConfig need not be)
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
            return call_evaluate(evaluate, self.model)
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
    counts: dict[str, int] = {}

    def hook(fqn: str) -> Callable[..., None]:
        def record(module: nn.Module, _inputs: Any, output: Tensor) -> None:
            weight = cast(Tensor, module.weight)
            per_output = weight.numel() // weight.shape[0]
            counts[fqn] = counts.get(fqn, 0) + 2 * per_output * output.numel()

        return record

    run_with_hooks(model, example_inputs, {f: hook(f) for f in fqns})
    return {f: counts.get(f, 0) for f in fqns}


def scan_layers(
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
    """Scan the layers a mask config (or `PerLayer`) selects; prunes and restores them in place.

    Each probe prunes one layer with its own rule at the level, as a rule for that layer alone
    (`with_level(level).as_layer_rule()`), so layers are never ranked together.
    """
    cells = cells or ScanCheckpoint()
    chosen = resolve(model, config)
    fqns = list(chosen)
    measure_baseline(cells, evaluate, model)
    probe = _LayerProbe(model, data)
    items = [(f, lv) for f in fqns for lv in levels]

    def measure_share() -> None:
        for fqn, level in progress_bar(cells.share(items), "sensitivity", progress):
            rule = chosen[fqn].with_level(level).as_layer_rule()
            _, why = cells.measure(f"{fqn}@{level!r}", probe.run, fqn, rule, evaluate)
            if why is not None and on_error == "stop":
                return  # the merged cells raise below, at the first failure in scan order

    cells.run_share(measure_share, len(items))
    baseline = float(cells.result("baseline")[0])
    values: dict[str, list[float]] = {f: [] for f in fqns}
    failures: dict[str, str] = {}
    for fqn, level in items:
        value, why = cells.result(f"{fqn}@{level!r}")
        values[fqn].append(value)
        record_failure(failures, "layer", fqn, level, why, on_error)
    layers = prunable_layers(model)
    params = {f: cast(Tensor, layers[f].weight).numel() for f in fqns}
    total = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    flops = layer_flops(model, example_inputs, fqns) if example_inputs is not None else None
    family = config if isinstance(config, MaskConfig) else chosen[fqns[0]]
    return SensitivityTable(
        fqns, levels, values, baseline, higher_is_better, config_to_dict(family), params, flops,
        total, None if flops is None else sum(flops.values()), failures, "layer",
    )
