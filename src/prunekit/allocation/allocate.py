"""Per-layer levels that meet a budget with the least predicted damage: `allocate(table, target)`.

The method is the Lagrangian / greedy marginal-cost allocation of rate-distortion theory
(Everett 1963, "Generalized Lagrange multiplier method"; Shoham & Gersho 1988, "Efficient bit
allocation for an arbitrary set of quantizers"), with a layer's sensitivity curve in the role of
a quantizer's distortion curve: the predicted damage of a choice of levels is the sum of each
layer's measured degradation at its level (the additivity assumption every sensitivity method
makes), and each step prunes further the layer whose next level buys the most budget per unit
of damage. Why this and not an exact multiple-choice knapsack (dynamic programming)? The DP
needs the budget discretised (millions of parameters, FLOPs or microseconds) and is exact only
for a model that is itself an approximation; the greedy walk over each curve's lower convex hull
is optimal at every budget the hulls' vertices reach (Shoham & Gersho, Thm. 1), runs in
O(units x levels x log), and never prefers a noisy, non-convex point whose neighbours say it is
a fluke. Curves are made monotone first (a level is never predicted less damaging than a lower
one), and levels that failed to evaluate are never chosen. The walk's last step can overshoot
the budget, so units then step back down their curves while the budget holds, and (with
`exact=True`) one unit gets a level between two scanned ones so the target is met exactly:
the continuous relaxation's optimum, which lies on a hull segment.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import Field
from torch import nn

from prunekit._moved import moved_name
from prunekit.allocation.sensitivity.groups import GroupPruner
from prunekit.allocation.sensitivity.table import SensitivityTable
from prunekit.allocation.solver import usable_points, walk
from prunekit.config import FrozenConfig, PerLayer, config_from_dict, recipe_type
from prunekit.core.plan import prune
from prunekit.errors import AllocationError, ConfigError

log = logging.getLogger(__name__)


class Target(FrozenConfig):
    """Base of allocation targets: a budget on one measured or predicted resource."""


@recipe_type
class SparsityTarget(Target):
    """Global parameter sparsity: the fraction of zeros over all scanned layers' weights.

    Example:
        >>> SparsityTarget(sparsity=0.9).sparsity
        0.9
    """

    sparsity: float = Field(gt=0.0, lt=1.0)


@recipe_type
class FlopsTarget(Target):
    """Remove this fraction of the model's forward FLOPs.

    For mask configs the FLOPs counted are those a sparse kernel executes (dense FLOPs x kept
    fraction); for channel configs they are the FLOPs the smaller dense model measures.
    """

    reduction: float = Field(gt=0.0, lt=1.0)


@recipe_type
class SizeTarget(Target):
    """The checkpoint must fit in `size_bytes`.

    Predicted from `prunekit.save`'s format before compression: dense tensors at 4 bytes per
    value, masked tensors at a 1-bit mask plus `bytes_per_value` per kept value, plus
    `overhead_bytes` of header and metadata (about 0.5 KB measured on small MLPs). Deflate makes
    the real file smaller still, so the prediction is an upper bound to check with `save`.
    """

    size_bytes: int = Field(gt=0)
    bytes_per_value: float = Field(default=4.0, gt=0.0)
    overhead_bytes: int = Field(default=1024, ge=0)


@recipe_type
class LatencyTarget(Target):
    """Be `speedup` times faster than the dense model, as timed on this device by a `LatencyTable`."""

    speedup: float = Field(gt=1.0)


@dataclass(frozen=True)
class Allocation:
    """The chosen level per unit, with what it predicts.

    Attributes:
        levels: unit (layer FQN or channel group) -> level (0.0 = left dense).
        target: the target met.
        achieved: the predicted value of the target's quantity (sparsity, FLOPs reduction,
            bytes or speed-up) at these levels.
        predicted_degradation: sum of the units' degradations at their levels.
        family: the config family (recipe data) the levels apply to.
        kind: "layer" or "group".
    """

    levels: dict[str, float]
    target: Target
    achieved: float
    predicted_degradation: float
    family: dict[str, Any]
    kind: Literal["layer", "group"] = "layer"

    def to_config(self, family: FrozenConfig | None = None) -> PerLayer:
        """`PerLayer` rules (a new config; nothing mutated): each pruned layer gets `family` at its
        level, dense layers None.

        Works for every config with a level (`FrozenConfig.with_level`: a mask config's
        sparsity, N:M up to its pattern, Wanda/SparseGPT criteria included). Each leaf is
        `family.with_level(level).as_layer_rule()`: the rule key already says which layer it
        prunes, and layers given the same level are not ranked together.
        """
        family = family if family is not None else config_from_dict(self.family, where="Allocation.family")
        if self.kind == "group":
            raise ConfigError("channel-group levels are not per-layer rules: use Allocation.apply(model, inputs)")
        rules: dict[str, Any] = {}
        for unit, level in self.levels.items():
            rules[unit] = family.with_level(level).as_layer_rule() if level > 0 else None
        return PerLayer(rules)

    def apply(self, model: nn.Module, example_inputs: Any = None, data: Any = None) -> nn.Module:
        """Prune `model` as allocated, in place (mutates and returns `model`), all or nothing.

        Layers: masks, as `prunekit.prune(model, self.to_config())`. Channel groups: one
        channel plan removing each group's lowest-scoring units at its own ratio, applied to
        `model` itself as `ChannelPlan.apply` does (on error it is rolled back, `model` left
        intact); needs `example_inputs` to trace. Pass `copy.deepcopy(model)` to keep the
        dense model, e.g. to compare the two or to apply several allocations.
        """
        family = config_from_dict(self.family, where="Allocation.family")
        if self.kind == "layer":
            return prune(model, self.to_config(family), data=data)
        pruner = GroupPruner(model, family, example_inputs, data)
        return pruner.plan_many({u: lv for u, lv in self.levels.items() if lv > 0}).apply(model)

    def summary(self) -> str:
        """One line per unit with its level, then what the allocation predicts."""
        width = max([len(u) for u in self.levels] + [4])
        rows = [f"{u:<{width}}  {lv:6.3f}" for u, lv in self.levels.items()]
        rows.append(f"target {self.target!r}: predicted {self.achieved:.4g}, "
                    f"predicted degradation {self.predicted_degradation:.4g}")
        return "\n".join(rows)

    def __str__(self) -> str:
        return self.summary()


# --------------------------------------------------------------------------------------------
# Budget models: per unit and level, how much of the target's resource a level saves.


@dataclass
class Budget:
    """A target's resource as the allocation walks it: per unit and level, how much it saves.

    `allocate` builds one per target type; `LatencyTable.budget` builds the latency one.
    """

    savings: dict[str, list[float]]  # unit -> saving at each table level
    required: float  # total saving needed
    achieved: Callable[[float], float]  # total saving -> the target's quantity
    name: str  # the quantity in words, for errors
    field: str  # the target's field, for errors


def _budget(table: SensitivityTable, target: Target, latency: Any) -> Budget:
    n = len(table.levels)
    if isinstance(target, SparsityTarget):
        total = sum(table.params.values())
        savings = {u: [table.removed_at("params", u, i) for i in range(n)] for u in table.units}
        return Budget(savings, target.sparsity * total, lambda s: s / total, "parameter sparsity", "sparsity")
    if isinstance(target, FlopsTarget):
        flops = table.total_flops
        if flops is None:
            raise ConfigError("FlopsTarget: the table has no FLOPs; pass example_inputs= to sensitivity()")
        savings = {u: [table.removed_at("flops", u, i) for i in range(n)] for u in table.units}
        return Budget(savings, target.reduction * flops, lambda s: s / flops, "FLOPs reduction", "reduction")
    if isinstance(target, SizeTarget):
        return _size_budget(table, target)
    if isinstance(target, LatencyTarget):
        if latency is None:
            raise ConfigError("LatencyTarget needs latency=measure_latency_table(model, config, levels, inputs)")
        return latency.budget(table, target)
    raise ConfigError(f"allocate: unknown target type {type(target).__name__}")


def _size_budget(table: SensitivityTable, target: SizeTarget) -> Budget:
    n = len(table.levels)
    if table.kind == "group":  # smaller dense tensors: every removed parameter saves 4 bytes
        savings = {u: [4.0 * table.removed_at("params", u, i) for i in range(n)] for u in table.units}
        dense = 4.0 * table.total_params
    else:  # a masked tensor: numel/8 mask bytes, then bytes_per_value per kept value
        dense = 4.0 * table.total_params
        savings = {}
        for u in table.units:
            numel = table.params[u]
            stored = [numel / 8 + target.bytes_per_value * numel * (1 - lv) for lv in table.levels]
            savings[u] = [4.0 * numel - b for b in stored]
    dense += target.overhead_bytes
    return Budget(savings, dense - target.size_bytes, lambda s: dense - s, "predicted size in bytes", "size_bytes")


# --------------------------------------------------------------------------------------------
# The allocation.


def allocate(
    table: SensitivityTable,
    target: Target,
    *,
    latency: Any = None,
    max_level: float | None = None,
    min_level: float | None = None,
    exact: bool = True,
) -> Allocation:
    """Choose one level per unit that meets `target` with the least predicted degradation.

    Args:
        table: a `SensitivityTable` from `prunekit.sensitivity`.
        target: `SparsityTarget`, `FlopsTarget`, `SizeTarget` or `LatencyTarget`.
        latency: a `LatencyTable` (from `measure_latency_table`), needed for `LatencyTarget`.
        max_level: never choose a level above this (e.g. to keep every layer trainable).
        min_level: never choose a level below this: every unit starts at its lowest scanned
            level >= `min_level` (with `max_level`, a band around the average as in OWL, Yin
            et al. 2024, which keeps the additive prediction near where it was measured).
        exact: give one unit an interpolated level between two scanned ones so the target is
            met exactly instead of overshot (the continuous relaxation); False keeps scanned
            levels only.

    Returns:
        An `Allocation`; `to_config()` turns it into `PerLayer` rules for `prunekit.prune`.

    Raises:
        AllocationError: the target cannot be met even at the highest usable level of every
            unit; the message says which constraint binds and the closest achievable target.

    Example:
        >>> from prunekit.methods.unstructured import UnstructuredConfig
        >>> from torch import nn
        >>> from prunekit.allocation.sensitivity import sensitivity
        >>> model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
        >>> t = sensitivity(model, UnstructuredConfig(sparsity=0.5), lambda m: 1.0, levels=[0.5, 0.9])
        >>> allocate(t, SparsityTarget(sparsity=0.5)).achieved >= 0.5
        True
    """
    budget = _budget(table, target, latency)
    points = usable_points(table, budget.savings, max_level=max_level, min_level=min_level)
    best = sum(p[-1][0] for p in points.values())  # a hull ends at its curve's last point
    if best < budget.required - 1e-9:
        raise AllocationError(_unreachable(table, target, budget, best, max_level))
    levels, saved, damage = walk(points, budget.required, exact=exact)
    log.info("allocate: %s -> predicted %.4g, degradation %.4g", target, budget.achieved(saved), damage)
    return Allocation(levels, target, budget.achieved(saved), damage, table.family, table.kind)


def _unreachable(table: SensitivityTable, target: Target, budget: Budget, best: float, max_level: float | None) -> str:
    top = max_level if max_level is not None else max(table.levels)
    failed = sorted({k.rpartition("@")[0] for k in table.failures})
    binds = f"the highest allowed level ({top:g}) in every unit"
    if failed:
        binds += f", and units whose probes failed stop below it ({', '.join(failed[:4])})"
    if table.kind == "layer" and isinstance(target, (SparsityTarget, SizeTarget, FlopsTarget)):
        binds += "; layers outside the scan stay dense"
    if table.kind == "layer" and isinstance(target, LatencyTarget):
        binds += ("; masks keep dense shapes, which dense kernels run no faster (use a ChannelConfig, "
                  "or N:M with a sparse kernel)")
    closest = budget.achieved(best)
    return (f"{type(target).__name__}.{budget.field}={getattr(target, budget.field)!r} cannot be met: "
            f"binding constraint is {binds}. The closest achievable {budget.name} is {closest:.4g}; "
            "scan higher levels or relax the target")


def __getattr__(name: str) -> Any:  # run_sensitivity_recipe moved to prunekit.recipes.sensitivity (warns)
    return moved_name(__name__, name)
