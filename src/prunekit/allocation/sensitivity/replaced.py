"""The module-replacing scan of `prunekit.sensitivity` (`LowRankConfig`): factorize one layer on a copy.

A probe replaces one layer by its rank-r pair at one level (the share of its weights removed)
on a copy of the model, since the module changes; the parameters and FLOPs it removes are
measured on the copy, as the channel-group scan does.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from typing import Any

from torch import nn

from prunekit.allocation.sensitivity.common import (
    Evaluate,
    ScanCheckpoint,
    call_evaluate,
    measure_baseline,
    record_failure,
)
from prunekit.allocation.sensitivity.table import SensitivityTable
from prunekit.config import FrozenConfig, PerLayer, config_to_dict
from prunekit.core.counting import count_flops, count_params
from prunekit.core.plan import plan
from prunekit.core.progress import progress as progress_bar
from prunekit.core.targets import resolve


def scan_replaced_layers(
    model: nn.Module, config: FrozenConfig, evaluate: Evaluate, levels: list[float], *,
    higher_is_better: bool, example_inputs: Any, data: Iterable[Any] | None, on_error: str, progress: bool,
    cells: ScanCheckpoint | None = None,
) -> SensitivityTable:
    """Scan each layer `config` selects: factorize it alone at each level on a copy, measure, drop the copy."""
    cells = cells or ScanCheckpoint()
    chosen = resolve(model, config)
    measure_baseline(cells, evaluate, model)
    before = (count_params(model), count_flops(model, example_inputs) if example_inputs is not None else 0)
    items = [(f, lv) for f in chosen for lv in levels]

    def probe(fqn: str, level: float) -> tuple[float, str | None, int, int]:
        rule = PerLayer({fqn: chosen[fqn].with_level(level).as_layer_rule()})
        pruned = plan(model, rule).apply(copy.deepcopy(model))
        flops = before[1] - count_flops(pruned, example_inputs) if example_inputs is not None else 0
        return (*call_evaluate(evaluate, pruned), before[0] - count_params(pruned), flops)

    def measure_share() -> None:
        for fqn, level in progress_bar(cells.share(items), "sensitivity", progress):
            why = cells.measure(f"{fqn}@{level!r}", probe, fqn, level)[1]
            if why is not None and on_error == "stop":
                return

    cells.run_share(measure_share, len(items))
    values: dict[str, list[float]] = {f: [] for f in chosen}
    removed: dict[str, dict[str, list[int]]] = {"params": {f: [] for f in chosen}, "flops": {f: [] for f in chosen}}
    failures: dict[str, str] = {}
    for fqn, level in items:
        value, why, gone_params, gone_flops = cells.result(f"{fqn}@{level!r}")
        values[fqn].append(value)
        removed["params"][fqn].append(gone_params)
        removed["flops"][fqn].append(gone_flops)
        record_failure(failures, "layer", fqn, level, why, on_error)
    modules = dict(model.named_modules())
    params = {f: modules[f].weight.numel() for f in chosen}
    family = config if not isinstance(config, PerLayer) else next(iter(chosen.values()))
    return SensitivityTable(
        list(chosen), levels, values, float(cells.result("baseline")[0]), higher_is_better, config_to_dict(family),
        params, None, before[0], before[1] if example_inputs is not None else None, failures, "layer", removed,
    )
