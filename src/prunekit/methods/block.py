"""Block-sparse pruning: the config, the mask math, its planner and a checker.

A block mask zeroes whole `(rows, cols)` tiles of a weight, the granularity block-sparse
kernels (BSR) can skip: issue 9 measured that a random 90 % mask still leaves 82-100 % of the
blocks non-zero, so a block kernel gains nothing from an unstructured mask.

Tiles are ranked by the mean of any element-wise criterion's scores over the tile. Narang et
al. 2017 ("Block-Sparse Recurrent Neural Networks") rank by the largest magnitude in a tile; the
mean lets every criterion (Wanda's |W| * ||X||, Sun et al. 2023, included) carry over unchanged
and does not keep a tile for one large weight among many small ones. Mean and sum rank alike,
as all tiles have the same size.

A weight of shape (out, in, *k) is tiled as the 2-D matrix (out, in * prod(k)), the layout a
GEMM (or im2col convolution) sees.
"""

from __future__ import annotations

import logging
import math
import warnings
from dataclasses import dataclass
from typing import Literal

import torch
from pydantic import Field, PositiveInt
from torch import Tensor, nn

from prunekit.config import MaskConfig, recipe_type
from prunekit.core.criteria import CriterionName, get_criterion
from prunekit.core.masks import global_topk_masks, topk_mask
from prunekit.core.plan import MaskPlan, PlanContext, register_method, score_layers
from prunekit.core.targets import layers_to_check, split_fitting
from prunekit.errors import ConfigError, PlanError
from prunekit.methods.calibration import Pattern, dense_pass_stats, get_solver, plan_with_data

log = logging.getLogger(__name__)


@recipe_type
class BlockConfig(MaskConfig):
    """Zero the least important `(rows, cols)` blocks of each weight, whole blocks only.

    Args:
        sparsity: fraction of blocks (hence of weights) zeroed, in [0, 1); rounded to whole
            blocks per layer (or over all layers with `scope="global"`).
        block: tile shape (rows along the output dim, cols along the flattened input dim).
        criterion: element-wise importance score averaged over each block: "l1" (magnitude),
            "wanda" (Sun et al. 2023; needs `data=` calibration batches), "random".
        scope: "layer" prunes each layer to `sparsity` on its own (with a calibration
            criterion, block by block through the model, like Wanda); "global" ranks the
            blocks of all layers together.
        indivisible: a layer whose 2-D weight shape is not a multiple of `block`: "skip"
            leaves it dense with a logged warning naming it (listed under the plan's
            `skipped`), "error" raises. Layers are never padded.
        exclude: layer FQNs or "re:<regex>" patterns to leave dense.

    A `GradualPruner` ramps `sparsity` like `UnstructuredConfig`'s; blocks pruned at one
    step score -inf at the next, so they stay pruned.

    Example:
        >>> BlockConfig(sparsity=0.5, block=(4, 4)).target_sparsity
        0.5
    """

    sparsity: float = Field(ge=0.0, lt=1.0)
    block: tuple[PositiveInt, PositiveInt] = (8, 8)
    criterion: CriterionName = "l1"
    scope: Literal["layer", "global"] = "layer"
    indivisible: Literal["skip", "error"] = "skip"

    def with_sparsity(self, sparsity: float) -> BlockConfig:
        return self.model_copy(update={"sparsity": sparsity})

    def as_layer_rule(self) -> BlockConfig:
        return self.model_copy(update={"exclude": (), "scope": "layer"})

    @property
    def target_sparsity(self) -> float:
        return self.sparsity


# --------------------------------------------------------------------------------------------
# Mask math.


def _indivisible(shape: tuple[int, ...], block: tuple[int, int]) -> str | None:
    """Why a weight of `shape` cannot be tiled by `block`, or None when it can."""
    if len(shape) < 2:
        return f"shape {shape} has fewer than 2 dims"
    rows, cols = shape[0], math.prod(shape[1:])
    if rows % block[0] or cols % block[1]:
        return f"shape {shape} (as {rows}x{cols}) is not a multiple of block {block[0]}x{block[1]}"
    return None


def block_scores(scores: Tensor, block: tuple[int, int]) -> Tensor:
    """Mean of `scores` over each `block` tile: shape (rows / block[0], cols / block[1]).

    Elements scored -inf (pruned before) count as 0; a tile pruned entirely stays -inf, so a
    schedule never revives it. The mean ranks exactly like the sum (all tiles are equal size).

    Raises:
        ConfigError: the shape is not a multiple of `block`.
    """
    why = _indivisible(tuple(scores.shape), block)
    if why:
        raise ConfigError(f"block scores: {why}")
    br, bc = block
    s = scores.detach().float().reshape(scores.shape[0], -1)
    dead = s == float("-inf")
    tiles = s.masked_fill(dead, 0.0).reshape(s.shape[0] // br, br, s.shape[1] // bc, bc)
    mean = tiles.mean(dim=(1, 3))
    all_dead = dead.reshape(tiles.shape).all(dim=3).all(dim=1)
    return mean.masked_fill(all_dead, float("-inf"))


def expand_blocks(keep: Tensor, block: tuple[int, int], shape: tuple[int, ...]) -> Tensor:
    """Blow a per-tile keep mask up to the full weight `shape` (every tile all True or all False)."""
    full = keep.repeat_interleave(block[0], dim=0).repeat_interleave(block[1], dim=1)
    return full.reshape(shape)


def block_mask(scores: Tensor, sparsity: float, block: tuple[int, int]) -> Tensor:
    """Keep the highest-scoring `1 - sparsity` of the tiles of `scores` (True = keep).

    Example:
        >>> block_mask(torch.tensor([[1.0, 1.0, 5.0, 5.0]]), 0.5, (1, 2))
        tensor([[False, False,  True,  True]])
    """
    return expand_blocks(topk_mask(block_scores(scores, block), sparsity), block, tuple(scores.shape))


@dataclass(frozen=True)
class _BlockPattern(Pattern):
    """A calibration pattern (see `prunekit.methods.calibration`) that selects whole tiles per layer."""

    block: tuple[int, int] = (1, 1)

    def select(self, scores: Tensor) -> Tensor:
        return block_mask(scores, self.sparsity, self.block)


# --------------------------------------------------------------------------------------------
# The checker.


@dataclass(frozen=True)
class BlockReport:
    """Per-layer result of `check_blocks`: tiles, all-zero tiles, and partly-zero tiles."""

    block: tuple[int, int]
    blocks: dict[str, int]
    zero_blocks: dict[str, int]
    partial_blocks: dict[str, int]
    skipped: dict[str, str]

    @property
    def zero_fraction(self) -> dict[str, float]:
        """Per layer, the fraction of tiles that are entirely zero (what a BSR kernel skips)."""
        return {k: self.zero_blocks[k] / n for k, n in self.blocks.items()}

    def __str__(self) -> str:
        width = max([len(k) for k in (*self.blocks, *self.skipped)] + [5])
        br, bc = self.block
        rows = [f"{'layer':<{width}}  {f'{br}x{bc} blocks':>12}  all-zero  partly-zero"]
        rows += [
            f"{k:<{width}}  {n:>12}  {self.zero_fraction[k]:8.2%}  {self.partial_blocks[k]:>11}"
            for k, n in self.blocks.items()
        ]
        rows += [f"{k:<{width}}  skipped: {why}" for k, why in self.skipped.items()]
        return "\n".join(rows)


def check_blocks(model: nn.Module, block: tuple[int, int], *, layers: list[str] | None = None) -> BlockReport:
    """Report, per layer, how many `block` tiles of the effective weight are entirely zero.

    Reads the weights as inference sees them (masks applied); the model is not mutated.
    `partial_blocks` counts tiles holding some zeros and some non-zeros: 0 for a mask that
    `BlockConfig` produced.

    Args:
        model: the model to check.
        block: tile shape (rows, cols).
        layers: FQNs to check; default every layer a default config prunes (those `block` does
            not tile, and a language model's head, are listed under `skipped` with the reason).

    Example:
        >>> check_blocks(nn.Linear(8, 4), (2, 2)).zero_fraction
        {'': 0.0}
    """

    modules, kept_dense = layers_to_check(model, layers)
    blocks, zero, partial, skipped = {}, {}, {}, dict(kept_dense)
    with torch.no_grad():
        for fqn, module in modules.items():
            w: Tensor = module.weight  # type: ignore[assignment]
            why = _indivisible(tuple(w.shape), block)
            if why:
                skipped[fqn] = why
                continue
            nonzero = block_scores((w != 0).float(), block) * (block[0] * block[1])
            blocks[fqn] = nonzero.numel()
            zero[fqn] = int((nonzero == 0).sum())
            partial[fqn] = int(((nonzero > 0) & (nonzero < block[0] * block[1] - 0.5)).sum())
    return BlockReport(tuple(block), blocks, zero, partial, skipped)  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------------
# The planner.


def _split_divisible(model: nn.Module, fqns: list[str], config: BlockConfig) -> tuple[list[str], dict[str, str]]:
    """Split layers into those `config.block` tiles and the skipped rest (warned once each)."""
    return split_fitting(model, fqns, lambda shape: _indivisible(shape, config.block), indivisible=config.indivisible,
                         pattern=f"block {config.block[0]}x{config.block[1]}",
                         advice="exclude it, pick a block that divides it, or use BlockConfig(indivisible='skip') "
                                "to leave it dense",
                         key=("block", tuple(config.block)), logger=log)


def _check_finite(scores: dict[str, Tensor]) -> None:
    for key, s in scores.items():
        if torch.isnan(s).any() or (s == float("inf")).any():
            raise PlanError(f"layer {key.removesuffix('.weight')!r}: weight has NaN/Inf; cannot rank its blocks")


def _global_masks(scores: dict[str, Tensor], config: BlockConfig) -> dict[str, Tensor]:
    _check_finite(scores)
    tiles = {k: block_scores(s, config.block) for k, s in scores.items()}
    keep = global_topk_masks(tiles, config.sparsity)
    emptied = [k for k, m in keep.items() if not m.any()]
    if emptied:  # global ranking can starve a layer whose blocks all score low
        warnings.warn(f"global block pruning to {config.sparsity:.0%} removes every block of {emptied}; "
                      "exclude them or use scope='layer'", stacklevel=4)
    return {k: expand_blocks(keep[k], config.block, tuple(scores[k].shape)) for k in scores}


def _plan_with_data(model: nn.Module, config: BlockConfig, fqns: list[str], ctx: PlanContext) -> MaskPlan:
    if get_solver(config.criterion).updates_weights:
        raise ConfigError(
            f"BlockConfig.criterion: {config.criterion!r} reconstructs weights element by element, "
            "which breaks whole blocks; use 'wanda' or 'l1'"
        )
    if config.scope == "layer":
        pattern = _BlockPattern("unstructured", config.sparsity, block=tuple(config.block))  # type: ignore[arg-type]
        return plan_with_data(model, fqns, ctx, config.criterion, pattern)
    # Global ranking compares layers on one set of statistics, so take them from one dense pass.
    dense_pass_stats(model, fqns, ctx, config.criterion)
    return MaskPlan(_global_masks(score_layers(model, fqns, config.criterion, ctx), config))


@register_method(BlockConfig)
def _plan_block(model: nn.Module, config: BlockConfig, fqns: list[str] | None, ctx: PlanContext) -> MaskPlan:
    eligible, skipped = _split_divisible(model, fqns or [], config)
    if not eligible:
        raise PlanError(f"block {config.block[0]}x{config.block[1]}: no layer can be pruned ({skipped})")
    if get_criterion(config.criterion).needs_data:
        result = _plan_with_data(model, config, eligible, ctx)
    else:
        scores = score_layers(model, eligible, config.criterion, ctx)
        if config.scope == "global":
            result = MaskPlan(_global_masks(scores, config))
        else:
            _check_finite(scores)
            result = MaskPlan({k: block_mask(s, config.sparsity, config.block) for k, s in scores.items()})
    result.skipped.update(skipped)
    return result
