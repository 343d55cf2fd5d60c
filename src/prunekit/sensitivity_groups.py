"""Sensitivity of coupled channel groups: the `ChannelConfig` branch of `prunekit.sensitivity`.

A group (Li et al. 2017, "Pruning filters for efficient ConvNets"; the coupled groups of Fang
et al. 2023, "DepGraph") is pruned alone by excluding every other group's layers; the probe
runs on a copy because removing channels changes shapes. The parameters and FLOPs each probe
removes are measured on the pruned copy, since a group's channels also narrow the layers it
feeds.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Iterable
from typing import Any

from torch import Tensor, nn

from prunekit.config import FrozenConfig, config_to_dict
from prunekit.errors import ConfigError
from prunekit.sensitivity import Evaluate, SensitivityError, SensitivityTable, _call_evaluate, _progress

log = logging.getLogger(__name__)


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
) -> SensitivityTable:
    """Scan coupled channel groups: each probe prunes one group (all others excluded) on a copy."""
    from prunekit.plan import plan

    groups = channel_groups(model, config, example_inputs)
    excluded = set(config.exclude)  # type: ignore[attr-defined]
    baseline, why = _call_evaluate(evaluate, model)
    if why is not None:
        raise SensitivityError(f"evaluate fails on the unpruned model ({why}); fix it before scanning")
    everyone = sorted({layer for g in groups.values() for layer in g.layers} | excluded)
    values: dict[str, list[float]] = {n: [] for n in groups}
    removed: dict[str, dict[str, list[int]]] = {"params": {n: [] for n in groups}, "flops": {n: [] for n in groups}}
    failures: dict[str, str] = {}
    for name, level in _progress([(n, lv) for n in groups for lv in levels], progress):
        others = tuple(x for x in everyone if x not in groups[name].layers)
        probe = config.model_copy(update={"ratio": level, "exclude": others})
        channel_plan = plan(model, probe, example_inputs, data=data)
        stats = channel_plan.stats
        removed["params"][name].append(stats["params_before"] - stats["params_after"])
        removed["flops"][name].append(stats["flops_before"] - stats["flops_after"])
        value, why = _call_evaluate(evaluate, channel_plan.apply(copy.deepcopy(model)))
        values[name].append(value)
        if why is not None:
            failures[f"{name}@{level:g}"] = why
            log.warning("sensitivity: group %r at level %g: %s", name, level, why)
            if on_error == "stop":
                raise SensitivityError(f"group {name!r} at level {level:g}: {why} (use on_error='continue' to skip)")
    params = {n: sum(int(p.numel()) for p in _group_tensors(model, g)) for n, g in groups.items()}
    total = sum(p.numel() for p in model.parameters())
    return SensitivityTable(list(groups), levels, values, baseline, higher_is_better, config_to_dict(config),
                            params, None, total, stats["flops_before"], failures, "group", removed)


def channel_groups(model: nn.Module, config: FrozenConfig, example_inputs: Any) -> dict[str, Any]:
    """Name -> coupled channel group (`prunekit.structured.Group`) a channel config can prune."""
    from prunekit.structured import analyze, trace

    if "ratio" not in type(config).model_fields or not hasattr(config, "exclude"):
        raise ConfigError(f"{type(config).__name__} is neither a mask config nor a channel config")
    if example_inputs is None:
        raise ConfigError("a ChannelConfig scan traces the model: pass example_inputs=")
    training = model.training
    model.eval()
    try:
        graph = analyze(model, trace(model, example_inputs), [])
    finally:
        model.train(training)
    excluded = set(config.exclude)
    groups = {g.name: g for g in graph.groups if g.layers and not excluded & set(g.layers)}
    if not groups:
        raise ConfigError("the model has no prunable channel group outside ChannelConfig.exclude")
    return groups


def _group_tensors(model: nn.Module, group: Any) -> list[Tensor]:
    tensors = dict(model.named_parameters())
    return list({id(tensors[f]): tensors[f] for f, _ in group.members if f in tensors}.values())
