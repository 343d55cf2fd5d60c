"""`ChannelConfig`: the value that asks for structured (channel, neuron, head) pruning."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from prunekit.config import FrozenConfig, Seed, recipe_type
from prunekit.structured.select import GroupCriterionName


@recipe_type
class ChannelConfig(FrozenConfig):
    """Physically remove the least important channels, neurons and attention heads.

    Args:
        ratio: fraction of each coupled group's units removed, in [0, 1). A unit is one
            channel or neuron, or one attention head (with grouped-query attention: one
            key/value head and the query heads that read it).
        head_ratio: fraction of attention heads removed, if different from `ratio` (e.g.
            half the FFN neurons but a third of the heads); None uses `ratio`.
        criterion: "l1"/"l2" group norm (Li et al. 2017; Fang et al. 2023), "bn_scale"
            (Liu et al. 2017, network slimming), "taylor" (Molchanov et al. 2019; needs
            `data=`), "random" (a control), or any name registered with
            `register_group_criterion`.
        scope: "layer" removes `ratio` of every group; "global" ranks units of all groups
            together (scores normalised per group) and removes `ratio` of all of them.
        round_to: kept units per group are rounded up to a multiple of this (e.g. 8 for
            SIMD-friendly widths).
        exclude: layer FQNs or "re:<regex>" whose output channels stay (their inputs may
            still shrink when the layer before them is pruned); each must match a module.
        seed: seed of the "random" criterion.

    Example:
        >>> ChannelConfig(ratio=0.3, criterion="l2", round_to=8, exclude=["fc"]).ratio
        0.3
    """

    ratio: float = Field(ge=0.0, lt=1.0)
    head_ratio: float | None = Field(default=None, ge=0.0, lt=1.0)
    criterion: GroupCriterionName = "l1"
    scope: Literal["layer", "global"] = "layer"
    round_to: int = Field(default=1, ge=1)
    exclude: tuple[str, ...] = ()
    seed: Seed = 0

    @field_validator("exclude", mode="before")
    @classmethod
    def _as_tuple(cls, value: object) -> object:
        return tuple(value) if isinstance(value, list) else value

    def with_level(self, level: float) -> ChannelConfig:
        """A copy removing `level` of each group's units: a channel config's level is its ratio."""
        return self.model_copy(update={"ratio": level})

    def as_layer_rule(self) -> ChannelConfig:
        """This config as the rule for one group: nothing excluded, nothing ranked across groups."""
        return self.model_copy(update={"exclude": (), "scope": "layer"})
