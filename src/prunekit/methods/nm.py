"""N:M semi-structured sparsity: the config, the mask math, its planner and a validator.

N:M keeps `n` weights in every group of `m` consecutive weights along the input dimension
(Mishra et al. 2021, "Accelerating Sparse Deep Neural Networks": 2:4 is what Ampere-and-later
sparse tensor cores run). For a Linear weight (out, in) a group is `m` neighbouring columns of
one row; for a conv weight (out, in, *k) a group is `m` neighbouring input channels at one
kernel position, the layout NVIDIA's ASP uses.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Literal

import torch
from pydantic import Field, model_validator
from torch import Tensor, nn

from prunekit.config import MaskConfig, recipe_type
from prunekit.core.criteria import CriterionName, get_criterion
from prunekit.core.masks import nm_groups, nm_mask
from prunekit.core.plan import MaskPlan, PlanContext, register_method, score_layers
from prunekit.core.targets import layers_to_check, split_fitting
from prunekit.errors import ConfigError, PlanError
from prunekit.methods.calibration import Pattern, plan_with_data

log = logging.getLogger(__name__)


@recipe_type
class NMConfig(MaskConfig):
    """Keep `n` of every `m` consecutive weights along each layer's input dimension.

    Args:
        n: weights kept per group, 1 <= n < m (2:4 keeps half).
        m: group size along the input dimension (4 and 8 are the hardware-friendly ones).
        criterion: importance score: "l1" (magnitude), "wanda" (Sun et al. 2023) or
            "sparsegpt" (Frantar & Alistarh 2023); the last two need `data=` calibration batches.
        indivisible: what to do with a layer whose input dimension is not a multiple of `m`:
            "skip" leaves it dense with a logged warning naming it (and the plan lists it under
            `skipped`), "error" raises.
        exclude: layer FQNs or "re:<regex>" patterns to leave dense.

    A schedule can ramp an N:M config gradually: `with_sparsity(s)` returns the k:m config
    with `k = m - ceil(s * m)` kept, so a `GradualPruner` walks the kept count down from m to
    n ("decaying pruning masks", Kao et al. 2022, "Training Recipe for N:M Structured Sparsity
    with Decaying Pruning Mask"). We chose decaying masks over SR-STE (Zhou et al. 2021)
    because they reuse the `Mask` parametrization and the schedules as they are, need no
    custom autograd, and the paper reports them at least on par for 2:4.

    Example:
        >>> NMConfig(n=2, m=4).target_sparsity
        0.5
    """

    n: int = Field(ge=1)
    m: int = Field(ge=2)
    criterion: CriterionName = "l1"
    indivisible: Literal["skip", "error"] = "skip"

    @model_validator(mode="after")
    def _n_below_m(self) -> NMConfig:
        if self.n >= self.m:
            raise ValueError(f"N:M needs n < m, got n={self.n}, m={self.m} (n is the count kept)")
        return self

    def with_sparsity(self, sparsity: float) -> NMConfig:
        """The k:m config a schedule asks for at `sparsity` (k rounded towards sparser)."""
        if sparsity > self.target_sparsity + 1e-9:
            raise ConfigError(
                f"NMConfig(n={self.n}, m={self.m}) cannot reach sparsity {sparsity:.4f} > "
                f"{self.target_sparsity:.4f}"
            )
        pruned = min(self.m - self.n, max(1, math.ceil(sparsity * self.m - 1e-9)))
        return self.model_copy(update={"n": self.m - pruned})

    @property
    def target_sparsity(self) -> float:
        return (self.m - self.n) / self.m


# --------------------------------------------------------------------------------------------
# Mask math.


@dataclass(frozen=True)
class NMReport:
    """Per-layer result of `check_nm`: groups checked and groups holding more than n nonzeros."""

    n: int
    m: int
    groups: dict[str, int]
    violations: dict[str, int]
    skipped: dict[str, str]

    @property
    def ok(self) -> bool:
        """True when every checked group of every layer obeys the pattern."""
        return not any(self.violations.values())

    def __str__(self) -> str:
        width = max([len(k) for k in (*self.groups, *self.skipped)] + [5])
        rows = [f"{'layer':<{width}}  {self.n}:{self.m} groups  violations"]
        rows += [f"{k:<{width}}  {self.groups[k]:>10}  {self.violations[k]:>10}" for k in self.groups]
        rows += [f"{k:<{width}}  skipped: {why}" for k, why in self.skipped.items()]
        return "\n".join(rows)


def check_nm(model: nn.Module, n: int, m: int, *, layers: list[str] | None = None) -> NMReport:
    """Report, per layer, whether every group of `m` weights holds at most `n` nonzeros.

    Reads the effective weights (masks applied), so it checks what inference will see.

    Args:
        model: the model to check (not mutated).
        n, m: the pattern.
        layers: FQNs to check; default every Linear/Conv layer a default config prunes whose
            input dim divides by `m` (the others, a language model's head among them, are listed
            under `skipped` with the reason).

    Example:
        >>> check_nm(nn.Linear(8, 2), 2, 4).ok
        False
    """

    modules, kept_dense = layers_to_check(model, layers)
    groups, violations, skipped = {}, {}, dict(kept_dense)
    with torch.no_grad():
        for fqn, module in modules.items():
            w: Tensor = module.weight  # type: ignore[assignment]
            if w.dim() < 2 or w.shape[1] % m:
                skipped[fqn] = f"input dim {w.shape[1] if w.dim() > 1 else w.numel()} not a multiple of {m}"
                continue
            nonzero = (nm_groups(w != 0, m)[0]).sum(dim=1)
            groups[fqn], violations[fqn] = nonzero.numel(), int((nonzero > n).sum())
    return NMReport(n, m, groups, violations, skipped)


# --------------------------------------------------------------------------------------------
# The planner.


def split_divisible(model: nn.Module, fqns: list[str], config: NMConfig) -> tuple[list[str], dict[str, str]]:
    """Split layers into those whose input dim divides by m and the skipped rest (logged)."""

    def misfit(shape: tuple[int, ...]) -> str | None:
        return None if shape[1] % config.m == 0 else f"input dim {shape[1]} is not a multiple of m={config.m}"

    return split_fitting(model, fqns, misfit, indivisible=config.indivisible, pattern=f"N:M {config.n}:{config.m}",
                         advice="exclude it or use NMConfig(indivisible='skip') to leave it dense",
                         key=("nm", config.m), logger=log)


@register_method(NMConfig)
def _plan_nm(model: nn.Module, config: NMConfig, fqns: list[str] | None, ctx: PlanContext) -> MaskPlan:
    eligible, skipped = split_divisible(model, fqns or [], config)
    if not eligible:
        raise PlanError(f"N:M {config.n}:{config.m}: no layer can be pruned ({skipped})")
    if get_criterion(config.criterion).needs_data:
        pattern = Pattern(kind="nm", n=config.n, m=config.m)
        result = plan_with_data(model, eligible, ctx, config.criterion, pattern)
    else:
        scores = score_layers(model, eligible, config.criterion, ctx)  # refuses NaN/Inf weights
        result = MaskPlan({k: nm_mask(s, config.n, config.m) for k, s in scores.items()})
    result.skipped.update(skipped)
    return result
