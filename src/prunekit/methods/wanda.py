"""Wanda: prune by weight magnitude times input activation norm (Sun et al. 2023).

"A Simple and Effective Pruning Approach for Large Language Models" scores each weight as
|W_ij| * ||X_j||_2, where X_j is input feature j over all calibration tokens, and compares
weights within each output row. It needs no weight update and no second-order information,
yet matches SparseGPT at 50 % on LLaMA because a few input features carry outsized
activations that magnitude pruning ignores.
"""

from __future__ import annotations

from torch import Tensor

from prunekit.core.criteria import ScoreContext
from prunekit.core.masks import warn_rounding
from prunekit.errors import ConfigError
from prunekit.methods.calibration import LayerStats, Pattern, register_solver

_REF = "Sun et al. 2023, A Simple and Effective Pruning Approach for Large Language Models"


def wanda_scores(weight: Tensor, sq_norm: Tensor) -> Tensor:
    """|W| * ||X_j||_2 for a (out, in) weight and the per-input-feature sum of squares."""
    return weight.detach().abs().float() * sq_norm.to(weight.device).float().sqrt().unsqueeze(0)


def wanda(weight: Tensor, ctx: ScoreContext) -> Tensor:
    """Element-wise Wanda score from calibration stats in `ctx.stats["sq_norm"]`."""
    sq_norm = ctx.stats.get("sq_norm")
    if sq_norm is None:
        raise ConfigError(f"layer {ctx.fqn!r}: criterion 'wanda' needs calibration data: pass data=...")
    return wanda_scores(weight, sq_norm)


@register_solver("wanda", score=wanda, reference=_REF)
def solve_wanda(
    weight: Tensor, keep: Tensor | None, stats: LayerStats, pattern: Pattern, fqn: str
) -> tuple[Tensor, None]:
    """Wanda's mask for one layer: per-row (or per N:M group) top scores; weights unchanged."""
    scores = wanda_scores(weight, stats.sq_norm)
    if pattern.kind == "unstructured":  # ranked per output row: a narrow input rounds hard
        warn_rounding(fqn, weight.shape[1], pattern.sparsity, "weights per output row")
    if keep is not None:  # weights a previous round pruned stay pruned
        scores = scores.masked_fill(~keep, float("-inf"))
    return pattern.select(scores), None
