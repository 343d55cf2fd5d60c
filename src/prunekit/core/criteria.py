"""Importance scores: higher means keep. Registered by name with `register_criterion`.

An element-wise criterion maps a weight tensor to a score tensor of the same shape. Criteria
that need calibration data (activation statistics) say so with `needs_data=True`; the caller
then passes the statistics in `ScoreContext`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Annotated, Any

import torch
from pydantic import AfterValidator
from torch import Tensor, nn

from prunekit._registry import Registry


@dataclass
class ScoreContext:
    """What a criterion may look at beside the weight: its layer, RNG, calibration stats."""

    fqn: str
    module: nn.Module
    generator: torch.Generator | None = None
    stats: dict[str, Any] = field(default_factory=dict)


ScoreFn = Callable[[Tensor, ScoreContext], Tensor]


@dataclass(frozen=True)
class CriterionInfo:
    """A registered criterion: its name, score function, and whether it needs data."""

    name: str
    fn: ScoreFn
    needs_data: bool = False
    reference: str = ""


CRITERIA: Registry[str, CriterionInfo] = Registry("criterion")


def register_criterion(
    name: str, *, needs_data: bool = False, reference: str = ""
) -> Callable[[ScoreFn], ScoreFn]:
    """Decorator: register an element-wise importance score under `name`.

    A criterion that needs calibration data registers through
    `prunekit.methods.calibration.register_solver` instead, once, with its layer solver.
    """
    return CRITERIA.decorator(name, lambda fn: CriterionInfo(name, fn, needs_data, reference))


def get_criterion(name: str) -> CriterionInfo:
    """Look up a criterion by name; the error lists the known ones."""
    return CRITERIA.get(name)


def list_criteria() -> list[str]:
    """Names of all registered criteria, sorted."""
    return CRITERIA.names()


def _registered(name: str) -> str:
    get_criterion(name)  # ConfigError is a ValueError: pydantic reports it under the field's name
    return name


CriterionName = Annotated[str, AfterValidator(_registered)]
"""A config field holding the name of a registered element-wise criterion."""


@register_criterion("l1", reference="Han et al. 2015, Learning both Weights and Connections")
def magnitude(weight: Tensor, ctx: ScoreContext) -> Tensor:
    """|w|: the magnitude criterion."""
    return weight.detach().abs()


@register_criterion("random", reference="control: uniform random scores")
def random_scores(weight: Tensor, ctx: ScoreContext) -> Tensor:
    """Uniform random scores from the context's generator (a control, not a method)."""
    return torch.rand(weight.shape, generator=ctx.generator, device="cpu").to(weight.device)
