"""Which layers a config prunes: prunable-layer discovery, `exclude`, and `PerLayer` rules.

Layers are named by FQN everywhere. A pattern is an exact FQN or "re:<regex>" (full match).
Every pattern a user writes must match something, so a misspelt name fails instead of
silently leaving a layer dense.
"""

from __future__ import annotations

import logging
import re
import weakref
from collections.abc import Callable, Hashable
from typing import Any

import torch
from torch import nn

from prunekit.config import FrozenConfig, PerLayer
from prunekit.core.masks import PRUNABLE_TYPES
from prunekit.errors import ConfigError, PlanError, UnsupportedLayerError


def matches(pattern: str, fqn: str) -> bool:
    """True if `pattern` (exact FQN or "re:<regex>") names `fqn`."""
    if pattern.startswith("re:"):
        try:
            return re.fullmatch(pattern[3:], fqn) is not None
        except (re.error, OverflowError, RecursionError) as err:  # an `exclude` pattern is user input
            raise ConfigError(f"pattern {pattern!r} is not a valid regex: {err}") from None
    return pattern == fqn


def prunable_layers(model: nn.Module) -> dict[str, nn.Module]:
    """FQN -> module for every layer whose weight prunekit can mask (Linear, Conv1d/2d/3d)."""
    layers = {fqn: m for fqn, m in model.named_modules() if isinstance(m, PRUNABLE_TYPES)}
    if not layers:
        raise UnsupportedLayerError(
            f"{type(model).__name__} has no prunable layers (nn.Linear or nn.Conv1d/2d/3d)"
        )
    return layers


def _check_patterns_match(patterns: Any, names: list[str], field: str) -> None:
    for pattern in patterns:
        if not any(matches(pattern, n) for n in names):
            sample = ", ".join(names[:6]) + (", ..." if len(names) > 6 else "")
            raise ConfigError(f"{field}: {pattern!r} matches no prunable layer (layers: {sample})")


def resolve(model: nn.Module, config: FrozenConfig) -> dict[str, FrozenConfig]:
    """Map each layer FQN to the leaf config that prunes it; layers left dense are absent.

    Raises:
        ConfigError: a rule or `exclude` pattern matches no layer, or nothing is left to prune.
        UnsupportedLayerError: the model has no prunable layers at all.
    """
    names = list(prunable_layers(model))
    if isinstance(config, PerLayer):
        keys = [k for k in config.rules if k != "_default"]
        _check_patterns_match(keys, names, "PerLayer.rules")
        chosen: dict[str, FrozenConfig] = {}
        for fqn in names:
            rule = next((k for k in keys if matches(k, fqn)), "_default")
            leaf = config.rules.get(rule)
            if leaf is not None:
                chosen[fqn] = leaf
    else:
        chosen = {fqn: config for fqn in names}

    for leaf in set(chosen.values()):
        exclude = getattr(leaf, "exclude", ())
        owners = [n for n, c in chosen.items() if c == leaf]
        _check_patterns_match(exclude, owners, f"{type(leaf).__name__}.exclude")
    chosen = {
        n: c for n, c in chosen.items() if not any(matches(p, n) for p in getattr(c, "exclude", ()))
    }
    if not chosen:
        raise ConfigError("the rules and exclude patterns leave no layer to prune")
    return chosen


def group_by_config(chosen: dict[str, FrozenConfig]) -> dict[FrozenConfig, list[str]]:
    """Invert `resolve`: each distinct leaf config -> the layer FQNs it prunes, in model order."""
    groups: dict[FrozenConfig, list[str]] = {}
    for fqn, leaf in chosen.items():
        groups.setdefault(leaf, []).append(fqn)
    return groups


_SKIP_WARNED: weakref.WeakKeyDictionary[nn.Module, set[Hashable]] = weakref.WeakKeyDictionary()


def split_fitting(
    model: nn.Module,
    fqns: list[str],
    misfit: Callable[[tuple[int, ...]], str | None],
    *,
    indivisible: str,
    pattern: str,
    advice: str,
    key: Hashable,
    logger: logging.Logger,
) -> tuple[list[str], dict[str, str]]:
    """Split layers into those whose weight shape fits a pattern and the rest, with the reason.

    `misfit(shape)` says why a layer does not fit (None if it does). `indivisible="error"` raises
    naming the layer and `advice`; "skip" leaves it dense and logs it, at WARNING once per model,
    layer and `key` (a GradualPruner re-plans at every update), then at DEBUG.
    """
    modules = dict(model.named_modules())
    eligible, skipped = [], {}
    for fqn in fqns:
        why = misfit(tuple(modules[fqn].weight.shape))
        if why is None:
            eligible.append(fqn)
            continue
        if indivisible == "error":
            raise ConfigError(f"layer {fqn!r}: {why}; {advice}")
        warned = _SKIP_WARNED.setdefault(model, set())
        level = logging.DEBUG if (fqn, key) in warned else logging.WARNING
        warned.add((fqn, key))
        logger.log(level, "%s: layer %r skipped (left dense, not padded): %s", pattern, fqn, why)
        skipped[fqn] = why
    return eligible, skipped


def check_finite_weight(fqn: str, module: nn.Module, doing: str) -> None:
    """Refuse a layer whose weight holds NaN/Inf: NaN ranks unpredictably and Inf always survives.

    Raises:
        PlanError: naming the layer and what could not be done with it (`doing`).
    """
    if not torch.isfinite(module.weight).all():  # type: ignore[arg-type]
        raise PlanError(f"layer {fqn!r}: weight has NaN/Inf; cannot {doing} (a diverged run or a corrupt checkpoint?)")
