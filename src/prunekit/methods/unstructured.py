"""Unstructured pruning: zero the least important individual weights, layer by layer or globally.

Magnitude-style criteria score each weight on its own (`core/criteria.py`); calibration criteria
(Wanda, SparseGPT) score it from the inputs its layer sees and run through `calibration.py`.
"""

from __future__ import annotations

import warnings
from typing import Any, Literal

from pydantic import Field
from torch import nn

from prunekit.config import MaskConfig, Seed, recipe_type
from prunekit.core.criteria import CriterionName, get_criterion
from prunekit.core.masks import global_topk_masks, topk_masks, warn_rounding
from prunekit.core.plan import MaskPlan, PlanContext, register_method, score_layers
from prunekit.errors import ConfigError
from prunekit.methods.calibration import Pattern, dense_pass_stats, get_solver, plan_with_data


@recipe_type
class UnstructuredConfig(MaskConfig):
    """Zero the least important individual weights.

    Args:
        sparsity: fraction of zeros in [0, 1) in the pruned weights.
        scope: "global" ranks all selected layers together (Han et al. 2015, "Learning both
            weights and connections"), "layer" prunes each layer to `sparsity` on its own.
        criterion: importance score name registered in `prunekit.core.criteria` ("l1" magnitude, "random").
        exclude: layer FQNs or "re:<regex>" patterns to leave dense; each must match a layer.
        seed: seed for criteria that draw random numbers.

    Example:
        >>> UnstructuredConfig(sparsity=0.9, scope="global")
        UnstructuredConfig(exclude=(), sparsity=0.9, scope='global', criterion='l1', seed=0)
    """

    sparsity: float = Field(ge=0.0, lt=1.0)
    scope: Literal["global", "layer"] = "global"
    criterion: CriterionName = "l1"
    seed: Seed = 0

    def with_sparsity(self, sparsity: float) -> UnstructuredConfig:
        return self.model_copy(update={"sparsity": sparsity})

    @property
    def target_sparsity(self) -> float:
        return self.sparsity

    def as_layer_rule(self) -> UnstructuredConfig:
        return self.model_copy(update={"exclude": (), "scope": "layer"})


def plan_sparsities_together(
    model: nn.Module, groups: dict[Any, list[str]], ctx: PlanContext
) -> tuple[list[MaskPlan], dict[Any, list[str]]]:
    """Solve `PerLayer` leaves that differ only in sparsity in one sequential calibration pass.

    An allocation gives each layer (or block) its own sparsity with one calibration criterion
    (Wanda, SparseGPT). Planned leaf by leaf, every distinct sparsity would run its own pass
    over the blocks, with the other leaves' layers still dense; solved together, later blocks
    calibrate through the pruned earlier ones exactly as with one uniform config, in one pass.

    Args:
        groups: leaf config -> the layer FQNs it prunes (`targets.group_by_config`).

    Returns:
        The plans of the merged leaves (`UnstructuredConfig`, scope "layer", a criterion
        that needs data; one plan per criterion) and the leaves left for their own planners.
    """
    patterns: dict[str, dict[str, Pattern]] = {}
    rest: dict[Any, list[str]] = {}
    for leaf, fqns in groups.items():
        if type(leaf) is UnstructuredConfig and leaf.scope == "layer" and get_criterion(leaf.criterion).needs_data:
            patterns.setdefault(leaf.criterion, {}).update({f: Pattern("unstructured", leaf.sparsity) for f in fqns})
        else:
            rest[leaf] = fqns
    plans = [plan_with_data(model, list(p), ctx, criterion, p) for criterion, p in patterns.items()]
    return plans, rest


def plan_unstructured_with_data(
    model: nn.Module, config: UnstructuredConfig, fqns: list[str], ctx: PlanContext
) -> MaskPlan:
    """`UnstructuredConfig` with a calibration criterion: per layer (sequential) or global.

    `scope="layer"` prunes `sparsity` of every output row of every layer, block by block.
    `scope="global"` ranks the criterion's scores over all layers from one dense pass; it
    is refused for SparseGPT, whose weight updates only make sense layer by layer.
    """
    if config.scope == "layer":
        return plan_with_data(model, fqns, ctx, config.criterion, Pattern("unstructured", config.sparsity))
    solver = get_solver(config.criterion)
    if solver.updates_weights:
        raise ConfigError(
            f"UnstructuredConfig.scope: criterion {config.criterion!r} reconstructs each layer on its "
            "own; use scope='layer'"
        )
    dense_pass_stats(model, fqns, ctx, config.criterion)
    return MaskPlan(global_topk_masks(score_layers(model, fqns, config.criterion, ctx), config.sparsity))



@register_method(UnstructuredConfig, plan_many=plan_sparsities_together)
def _plan_unstructured(
    model: nn.Module, config: UnstructuredConfig, fqns: list[str] | None, ctx: PlanContext
) -> MaskPlan:
    if get_criterion(config.criterion).needs_data:
        # Calibration criteria (Wanda, SparseGPT) run layer by layer over the data.
        return plan_unstructured_with_data(model, config, fqns or [], ctx)
    scores = score_layers(model, fqns or [], config.criterion, ctx, config.seed)
    if config.scope == "global":
        masks = global_topk_masks(scores, config.sparsity)
        emptied = [k for k, m in masks.items() if not m.any()]
        if emptied:  # global ranking can starve a small layer whose weights are all small
            warnings.warn(f"global pruning to {config.sparsity:.0%} removes every weight of {emptied}; "
                          "exclude them or use scope='layer'", stacklevel=3)
        return MaskPlan(masks)
    for key, score in scores.items():
        warn_rounding(key.removesuffix(".weight"), score.numel(), config.sparsity)
    return MaskPlan(topk_masks(scores, config.sparsity))
