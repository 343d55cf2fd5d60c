"""Sensitivity of coupled channel groups: the `ChannelConfig` branch of `prunekit.sensitivity`.

A group (Li et al. 2017, "Pruning filters for efficient ConvNets"; the coupled groups of Fang
et al. 2023, "DepGraph") is pruned alone, on a copy because removing channels changes shapes.
The parameters and FLOPs each probe removes are measured on the pruned copy, since a group's
channels also narrow the layers it feeds.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from typing import Any

import numpy as np
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
from prunekit.config import FrozenConfig, config_to_dict
from prunekit.core.counting import count_flops, count_params
from prunekit.core.progress import progress as progress_bar
from prunekit.errors import ConfigError
from prunekit.structured.config import ChannelConfig
from prunekit.structured.groups import DependencyGraph, Group, analyze
from prunekit.structured.plan import ChannelPlan, build_plan
from prunekit.structured.select import ScoreInputs, get_group_criterion, select_units, taylor_grads
from prunekit.structured.trace import trace


def scan_groups(
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
    """Scan coupled channel groups: each probe removes one group's channels on a copy.

    The model is traced and its groups scored once; each probe then only selects that group's
    lowest-scoring units at the level and applies the plan to a copy, so a scan costs one
    trace instead of one per probe (a large model's trace takes seconds).
    """
    cells = cells or ScanCheckpoint()
    measure_baseline(cells, evaluate, model)
    pruner = GroupPruner(model, config, example_inputs, data)
    groups = pruner.groups
    params_before, flops_before = count_params(model), count_flops(model, example_inputs)
    items = [(n, lv) for n in groups for lv in levels]

    def measure_share() -> None:
        for name, level in progress_bar(cells.share(items), "sensitivity", progress):
            why = cells.measure(f"{name}@{level!r}", _probe, pruner, name, level, evaluate,
                                (params_before, flops_before, example_inputs))[1]
            if why is not None and on_error == "stop":
                return  # the merged cells raise below, at the first failure in scan order

    cells.run_share(measure_share, len(items))
    baseline = float(cells.result("baseline")[0])
    values: dict[str, list[float]] = {n: [] for n in groups}
    removed: dict[str, dict[str, list[int]]] = {"params": {n: [] for n in groups}, "flops": {n: [] for n in groups}}
    failures: dict[str, str] = {}
    for name, level in items:
        value, why, gone_params, gone_flops = cells.result(f"{name}@{level!r}")
        removed["params"][name].append(gone_params)
        removed["flops"][name].append(gone_flops)
        values[name].append(value)
        record_failure(failures, "group", name, level, why, on_error)
    params = {n: sum(int(p.numel()) for p in _group_tensors(model, g)) for n, g in groups.items()}
    return SensitivityTable(list(groups), levels, values, baseline, higher_is_better, config_to_dict(config),
                            params, None, params_before, flops_before, failures, "group", removed)


def _probe(pruner: GroupPruner, name: str, level: float, evaluate: Evaluate,
           before: tuple[int, int, Any]) -> tuple[float, str | None, int, int]:
    """One cell: the metric of the copy without group `name` at `level`, and what it removed."""
    params_before, flops_before, example_inputs = before
    pruned = pruner.pruned(name, level)
    gone_params = params_before - count_params(pruned)
    gone_flops = flops_before - count_flops(pruned, example_inputs)
    return (*call_evaluate(evaluate, pruned), gone_params, gone_flops)


class GroupPruner:
    """Trace and score a model's channel groups once; then prune any one group on a copy.

    The probe of a scan or a latency table: one trace (seconds on a large model) instead of
    one per probe. Only that group's lowest-scoring units at the ratio are removed, as a
    `ChannelConfig` with every other group excluded would.
    """

    def __init__(self, model: nn.Module, config: FrozenConfig, example_inputs: Any,
                 data: Iterable[Any] | None = None) -> None:
        self.model, self.config = model, _channel_config(config)
        self.graph, self.scores = _scored_graph(model, self.config, example_inputs, data)
        self.groups = channel_groups(model, self.config, example_inputs, self.graph)
        self.index = {g.name: i for i, g in enumerate(self.graph.groups)}

    def pruned(self, name: str, level: float) -> nn.Module:
        """A copy of the model with group `name`'s channels removed at ratio `level`."""
        return self.pruned_many({name: level})

    def pruned_many(self, levels: dict[str, float]) -> nn.Module:
        """A copy of the model with each named group's channels removed at its own ratio."""
        return self.plan_many(levels).apply(copy.deepcopy(self.model))

    def plan_many(self, levels: dict[str, float]) -> ChannelPlan:
        """The channel plan removing each named group's lowest-scoring units at its own ratio.

        Nothing is mutated; `plan.apply(model)` then prunes `model` itself (all or nothing).
        """
        unknown = [n for n in levels if n not in self.groups]
        if unknown:
            raise ConfigError(f"no prunable channel group named {unknown[:4]} (groups: {list(self.groups)[:6]})")
        gone = [np.zeros(0, dtype=np.int64)] * len(self.graph.groups)
        for name, level in levels.items():
            i = self.index[name]
            gone[i] = select_units([self.graph.groups[i]], [self.scores[i]], level, "layer", self.config.round_to)[0]
        return build_plan(self.model, self.config, self.graph, gone)


def _channel_config(config: FrozenConfig) -> ChannelConfig:
    if not isinstance(config, ChannelConfig):
        raise ConfigError(f"{type(config).__name__} is neither a mask config nor a channel config")
    return config


def _scored_graph(model: nn.Module, config: ChannelConfig, example_inputs: Any,
                  data: Iterable[Any] | None) -> tuple[DependencyGraph, list[np.ndarray]]:
    """The dependency graph (traced once, nothing excluded) and every group's unit scores."""
    if example_inputs is None:
        raise ConfigError("a ChannelConfig scan traces the model: pass example_inputs=")
    graph = _trace(model, example_inputs)
    info = get_group_criterion(config.criterion)
    tensors = dict(model.named_parameters(remove_duplicate=False)) | dict(model.named_buffers(remove_duplicate=False))
    grads = None
    if info.needs_data:
        if data is None:
            raise ConfigError(f"criterion {config.criterion!r} needs a few batches of data: pass data=...")
        grads = taylor_grads(model, data, tensors)
    inputs = ScoreInputs(tensors, dict(model.named_modules()), grads, torch.Generator().manual_seed(config.seed))
    return graph, [np.asarray(info.fn(g, inputs), dtype=np.float64) for g in graph.groups]


def channel_groups(model: nn.Module, config: FrozenConfig, example_inputs: Any,
                   graph: DependencyGraph | None = None) -> dict[str, Group]:
    """Name -> coupled channel group (`prunekit.structured.Group`) a channel config can prune.

    `graph` is a `DependencyGraph` already traced from `model` (traced here if None).
    """
    config = _channel_config(config)
    if example_inputs is None:
        raise ConfigError("a ChannelConfig scan traces the model: pass example_inputs=")
    if graph is None:
        graph = _trace(model, example_inputs)
    excluded = set(config.exclude)
    groups = {g.name: g for g in graph.groups if g.layers and not excluded & set(g.layers)}
    if not groups:
        raise ConfigError("the model has no prunable channel group outside ChannelConfig.exclude")
    return groups


def _trace(model: nn.Module, example_inputs: Any) -> DependencyGraph:
    training = model.training
    model.eval()
    try:
        return analyze(model, trace(model, example_inputs), [])
    finally:
        model.train(training)


def _group_tensors(model: nn.Module, group: Group) -> list[Tensor]:
    tensors = dict(model.named_parameters())
    return list({id(tensors[f]): tensors[f] for f, _ in group.members if f in tensors}.values())
