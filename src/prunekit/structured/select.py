"""Score channel groups and pick the units to remove for a ratio, per group or globally.

A group criterion maps a `Group` to one score per unit (higher = keep). Each member tensor
contributes its per-position score, reduced over every other dim; members are normalised by
their mean so a 3x3 conv and its BatchNorm weigh alike, then averaged (Torch-Pruning's
"mean" group reduction). Registered by name with `register_group_criterion`.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Annotated, Any

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import AfterValidator
from torch import Tensor, nn

from prunekit._registry import Registry
from prunekit.core.inputs import call_model
from prunekit.errors import ConfigError, PlanError
from prunekit.structured.groups import Group, Member

log = logging.getLogger(__name__)


@dataclass
class ScoreInputs:
    """What a group criterion may use: tensors by FQN, gradients, an RNG."""

    tensors: dict[str, Tensor]
    modules: dict[str, nn.Module]
    grads: dict[str, Tensor] | None = None
    generator: torch.Generator | None = None


GroupScoreFn = Callable[[Group, ScoreInputs], np.ndarray]


@dataclass(frozen=True)
class GroupCriterionInfo:
    """A registered group criterion: name, function, whether it needs data, paper."""

    name: str
    fn: GroupScoreFn
    needs_data: bool = False
    reference: str = ""


GROUP_CRITERIA: Registry[str, GroupCriterionInfo] = Registry("structured criterion")
"""Name -> group criterion (`ChannelConfig.criterion` is checked against it)."""


def register_group_criterion(
    name: str, *, needs_data: bool = False, reference: str = ""
) -> Callable[[GroupScoreFn], GroupScoreFn]:
    """Decorator: register a per-unit group score under `name`."""

    def wrap(fn: GroupScoreFn) -> GroupScoreFn:
        GROUP_CRITERIA.register(name, GroupCriterionInfo(name, fn, needs_data, reference))
        return fn

    return wrap


def get_group_criterion(name: str) -> GroupCriterionInfo:
    """Look up a group criterion; the error lists the known ones."""
    return GROUP_CRITERIA.get(name)


def list_group_criteria() -> list[str]:
    """Names of the registered group criteria, sorted."""
    return GROUP_CRITERIA.names()


def _registered(name: str) -> str:
    get_group_criterion(name)  # ConfigError is a ValueError: pydantic reports it under the field's name
    return name


GroupCriterionName = Annotated[str, AfterValidator(_registered)]
"""A config field holding the name of a registered group criterion (`ChannelConfig.criterion`)."""


def _per_position(t: Tensor, dim: int, fn: Callable[[Tensor], Tensor]) -> np.ndarray:
    values = fn(t.detach().float())
    other = [d for d in range(values.dim()) if d != dim]
    return (values.sum(dim=other) if other else values).cpu().numpy().astype(np.float64)


def _reduce(group: Group, per_member: dict[Member, np.ndarray]) -> np.ndarray:
    """Average the members' unit scores, each normalised by its mean over units."""
    total = np.zeros(group.size)
    for member, pos_scores in per_member.items():
        unit = np.array([pos_scores[p].sum() for p in group.positions[member]])
        mean = unit.mean()
        total += unit / mean if mean > 0 else unit
    return total / max(len(per_member), 1)


def _weights(group: Group, inputs: ScoreInputs) -> list[Member]:
    heavy = [m for m in group.members if inputs.tensors[m[0]].dim() >= 2]
    return heavy or list(group.members)


@register_group_criterion("l1", reference="Li et al. 2017, Pruning Filters for Efficient ConvNets")
def l1_group(group: Group, inputs: ScoreInputs) -> np.ndarray:
    """Sum of |w| over each unit's slices of the group's weight tensors."""
    return _reduce(group, {m: _per_position(inputs.tensors[m[0]], m[1], torch.abs) for m in _weights(group, inputs)})


@register_group_criterion("l2", reference="Fang et al. 2023, DepGraph: Towards Any Structural Pruning")
def l2_group(group: Group, inputs: ScoreInputs) -> np.ndarray:
    """Group L2 norm: sqrt of the summed squares of each unit's slices."""
    squares = {m: _per_position(inputs.tensors[m[0]], m[1], torch.square) for m in _weights(group, inputs)}
    units = _reduce(group, squares)
    return np.sqrt(units)


@register_group_criterion("bn_scale", reference="Liu et al. 2017, Learning Efficient ConvNets through Network Slimming")
def bn_scale_group(group: Group, inputs: ScoreInputs) -> np.ndarray:
    """|gamma| of the group's BatchNorm layers; groups without BatchNorm fall back to L1."""
    scales = {
        m: _per_position(inputs.tensors[m[0]], 0, torch.abs)
        for m in group.members
        if m[0].endswith(".weight")
        and isinstance(inputs.modules.get(m[0].rpartition(".")[0]), nn.modules.batchnorm._BatchNorm)
    }
    if not scales:
        log.info("group %s has no BatchNorm: bn_scale falls back to l1", group.name)
        return l1_group(group, inputs)
    return _reduce(group, scales)


@register_group_criterion(
    "taylor", needs_data=True, reference="Molchanov et al. 2019, Importance Estimation for Neural Network Pruning"
)
def taylor_group(group: Group, inputs: ScoreInputs) -> np.ndarray:
    """(sum over the unit's parameters of g * w)^2: the first-order loss change of removing it."""
    if inputs.grads is None:
        raise ConfigError("criterion 'taylor' needs calibration data: pass data=...")
    total = np.zeros(group.size)
    for fqn, dim in group.members:
        grad = inputs.grads.get(fqn)
        if grad is None:
            continue
        gw = _per_position(inputs.tensors[fqn] * grad, dim, lambda t: t)
        total += np.array([gw[p].sum() for p in group.positions[(fqn, dim)]])
    return total**2


@register_group_criterion("random", reference="control: uniform random scores")
def random_group(group: Group, inputs: ScoreInputs) -> np.ndarray:
    """Uniform random unit scores (a control, not a method)."""
    return torch.rand(group.size, generator=inputs.generator, dtype=torch.float64).numpy()


def taylor_grads(model: nn.Module, data: Iterable[Any], tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    """Gradients of the loss summed over `data` batches, without touching `.grad` (no mutation).

    A batch `(x, y)` uses cross-entropy on the model's logits; a bare batch `x` uses the mean
    squared output (a label-free proxy). `x` is called as `call_model` calls any input: a
    tensor, a tuple of positional args, or a dict of keyword args.
    """
    names = [n for n, t in tensors.items() if isinstance(t, nn.Parameter) and t.requires_grad]
    params = [tensors[n] for n in names]
    sums: dict[str, Tensor] = {}
    was_training = model.training
    model.eval()
    try:
        for batch in data:
            x, y = (batch[0], batch[1]) if isinstance(batch, (tuple, list)) and len(batch) == 2 else (batch, None)
            out = call_model(model, x)
            if not isinstance(out, Tensor):
                out = out.logits if getattr(out, "logits", None) is not None else out[0]
            loss = F.cross_entropy(out, y) if y is not None else out.float().pow(2).mean()
            grads = torch.autograd.grad(loss, params, allow_unused=True)
            for name, g in zip(names, grads, strict=True):
                if g is not None:
                    sums[name] = sums[name] + g if name in sums else g.detach().clone()
    finally:
        model.train(was_training)
    if not sums:
        raise ConfigError("criterion 'taylor': data= gave no batches (or no gradients)")
    return sums


def units_to_keep(size: int, ratio: float, round_to: int) -> int:
    """How many of `size` units a group keeps: floor-remove `ratio`, round kept up to `round_to`."""
    keep = size - math.floor(ratio * size + 1e-9)
    if round_to > 1:
        keep = min(size, math.ceil(keep / round_to) * round_to)
    return max(keep, 1) if size else 0


def select_units(
    groups: list[Group],
    scores: list[np.ndarray],
    ratio: float,
    scope: str,
    round_to: int,
    head_ratio: float | None = None,
) -> list[np.ndarray]:
    """Indices of the units to remove from each group (lowest scores first).

    With `head_ratio`, attention-head groups are pruned on their own at that ratio (per group)
    and channel groups at `ratio` (by `scope`).

    Raises:
        PlanError: a global ranking would remove every unit of a group.
    """
    if head_ratio is not None:
        heads = [i for i, g in enumerate(groups) if g.kind == "head"]
        rest = [i for i in range(len(groups)) if i not in heads]
        out: list[np.ndarray] = [np.zeros(0, dtype=np.int64)] * len(groups)
        for idx, r, sc in ((heads, head_ratio, "layer"), (rest, ratio, scope)):
            picked = select_units([groups[i] for i in idx], [scores[i] for i in idx], r, sc, round_to)
            for i, p in zip(idx, picked, strict=True):
                out[i] = p
        return out
    if scope == "layer":
        out = []
        for g, s in zip(groups, scores, strict=True):
            keep = units_to_keep(g.size, ratio, round_to)
            out.append(np.sort(np.argsort(s, kind="stable")[: g.size - keep]))
        return out
    normed = [s / s.mean() if s.size and s.mean() > 0 else s for s in scores]
    flat = np.concatenate(normed) if normed else np.zeros(0)
    owner = np.concatenate([np.full(g.size, i) for i, g in enumerate(groups)]) if groups else np.zeros(0, int)
    n_remove = math.floor(ratio * flat.size + 1e-9)
    chosen = np.argsort(flat, kind="stable")[:n_remove]
    out = []
    offset = 0
    for i, g in enumerate(groups):
        local = np.sort(chosen[owner[chosen] == i] - offset)
        offset += g.size
        if len(local) >= g.size:
            raise PlanError(
                f"layer {g.name!r}: global ratio {ratio} would remove all {g.size} units of its group; "
                "use a smaller ratio, scope='layer', or exclude it"
            )
        keep = g.size - len(local)
        if round_to > 1:
            keep = min(g.size, math.ceil(keep / round_to) * round_to)
        out.append(np.sort(local[np.argsort(normed[i][local], kind="stable")][: g.size - keep]))
    return out


def bn_scale_penalty(model: nn.Module, strength: float = 1e-4) -> Tensor:
    """L1 penalty on every BatchNorm scale, to add to the training loss (network slimming).

    Liu et al. 2017, "Learning Efficient Convolutional Networks through Network Slimming":
    training with `loss + strength * sum |gamma|` drives unneeded channels' scales to zero,
    so the `bn_scale` criterion then removes them at little cost.

    Example:
        >>> loss = loss + bn_scale_penalty(model, 1e-4)  # doctest: +SKIP
    """
    terms = [
        m.weight.abs().sum()
        for m in model.modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.weight is not None
    ]
    if not terms:
        raise ConfigError(f"{type(model).__name__} has no BatchNorm with a scale to penalise")
    return strength * torch.stack(terms).sum()
