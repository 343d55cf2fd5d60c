"""Sparsity schedules (pure functions of the step) and the `GradualPruner` that follows them.

A schedule answers one question, `sparsity_at(step, final)`, and keeps no state, so a run
resumed at any step asks the same question and gets the same answer.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable
from typing import Any

import torch
from pydantic import Field, model_validator
from torch import nn

from prunekit.config import FrozenConfig, MaskConfig, PerLayer, recipe_type
from prunekit.core.distributed import attaching_masks, check_same_step, model_group
from prunekit.core.masks import load_mask_state_dict, mask_state_dict, set_mask
from prunekit.core.plan import plan
from prunekit.core.targets import resolve
from prunekit.core.tracking import Tracker, track
from prunekit.errors import CheckpointError, ConfigError

log = logging.getLogger(__name__)


class Schedule(FrozenConfig):
    """Base of schedules: `sparsity_at(step, final)` is a pure function."""

    def sparsity_at(self, step: int, final: float) -> float:
        raise NotImplementedError


@recipe_type
class OneShot(Schedule):
    """Prune to the final sparsity at `step` and never again."""

    step: int = Field(default=0, ge=0)

    def sparsity_at(self, step: int, final: float) -> float:
        return final if step >= self.step else 0.0


@recipe_type
class Polynomial(Schedule):
    """Polynomial-decay schedule of Zhu & Gupta 2017 ("To prune, or not to prune").

    s_t = s_f + (s_i - s_f) * (1 - (t - t0) / (end - t0)) ** power, updated every `every`
    steps from `start_step` (the warm-up before it stays at `initial_sparsity`) to `end_step`;
    after `end_step` the sparsity stays final. Pruning fast early and slowly late lets the
    network recover while few weights remain.
    """

    start_step: int = Field(default=0, ge=0)
    end_step: int = Field(gt=0)
    every: int = Field(default=1, ge=1)
    power: float = Field(default=3.0, gt=0)
    initial_sparsity: float = Field(default=0.0, ge=0.0, lt=1.0)

    @model_validator(mode="after")
    def _ordered(self) -> Polynomial:
        if self.end_step <= self.start_step:
            raise ValueError(f"end_step ({self.end_step}) must be after start_step ({self.start_step})")
        return self

    def sparsity_at(self, step: int, final: float) -> float:
        if step < self.start_step:
            return self.initial_sparsity if self.initial_sparsity else 0.0
        if step >= self.end_step:
            return final
        # Hold the value between updates: the step is floored to the last update step.
        t = self.start_step + (step - self.start_step) // self.every * self.every
        progress = (t - self.start_step) / (self.end_step - self.start_step)
        return final + (self.initial_sparsity - final) * (1.0 - progress) ** self.power


@recipe_type
class Cubic(Polynomial):
    """The cubic schedule (`Polynomial` with power 3), Zhu & Gupta 2017's default.

    Example:
        >>> Cubic(start_step=0, end_step=100, every=10).sparsity_at(50, 0.9)
        0.7875
    """

    power: float = Field(default=3.0, ge=3.0, le=3.0)


@recipe_type
class Iterative(Schedule):
    """Prune in rounds at the listed steps; each round removes the same share of survivors.

    After round k of K the sparsity is 1 - (1 - final) ** (k / K) (Han et al. 2015's
    prune-retrain loop, as in the lottery-ticket experiments of Frankle & Carbin 2019).
    """

    steps: tuple[int, ...] = Field(min_length=1)

    @model_validator(mode="after")
    def _sorted(self) -> Iterative:
        if list(self.steps) != sorted(set(self.steps)) or self.steps[0] < 0:
            raise ValueError(f"steps must be distinct, non-negative and increasing: {self.steps}")
        return self

    def sparsity_at(self, step: int, final: float) -> float:
        rounds = sum(1 for s in self.steps if step >= s)
        return 1.0 - (1.0 - final) ** (rounds / len(self.steps))


def _leaves_at(config: FrozenConfig, schedule: Schedule, step: int) -> FrozenConfig | None:
    """The config to prune with at `step`: each leaf's sparsity scaled by the schedule."""

    def at(leaf: MaskConfig) -> MaskConfig | None:
        s = schedule.sparsity_at(step, leaf.target_sparsity)
        return leaf.with_sparsity(s) if s > 0 else None

    if isinstance(config, PerLayer):
        rules = {k: (None if v is None else at(v)) for k, v in config.rules.items()}
        return PerLayer(rules) if any(v is not None for v in rules.values()) else None
    if not isinstance(config, MaskConfig):
        raise ConfigError(f"GradualPruner needs a mask config or PerLayer, got {type(config).__name__}")
    return at(config)


class GradualPruner:
    """Raise sparsity during training as `schedule` says; masks stay on through optimizer steps.

    Call `step(step)` after each optimizer step with the global step: the pruner has no hidden
    counter, so a run resumed from `state_dict()` continues exactly where it stopped.
    `straight_through=True` makes the masks pass gradients unmasked to the stored originals
    (see `prunekit.core.masks.Mask`): the same effective weights for a cheaper step. Masks only
    grow here, so a pruned weight stays pruned either way.

    On a model spread over ranks (FSDP2 `fully_shard`, or a DDP wrapper) build it and call
    `step` on every rank: each `step` checks with one small all_reduce that all ranks are at the
    same step and agree whether to update, and raises on all of them otherwise, so no rank's
    masks can drift; the updates themselves are collectives (see `MaskPlan.apply`).

    `tracker` (a `prunekit.core.tracking.Tracker`) records the schedule's sparsity after every
    `step` call as "prune/sparsity", on rank 0.

    Example:
        >>> model = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))
        >>> pruner = GradualPruner(model, UnstructuredConfig(sparsity=0.75), Cubic(end_step=10))
        >>> for step in range(11):
        ...     pruner.step(step)  # after opt.step()
        >>> pruner.current_sparsity
        0.75
    """

    def __init__(
        self,
        model: nn.Module,
        config: FrozenConfig,
        schedule: Schedule | None = None,
        *,
        data: Iterable[Any] | None = None,
        seed: int = 0,
        straight_through: bool = False,
        tracker: Tracker | None = None,
    ) -> None:
        self.model, self.tracker = model, tracker
        self.config = config
        self.schedule = schedule if schedule is not None else OneShot()
        self.data = data
        self.generator = torch.Generator().manual_seed(seed)
        self.current_sparsity = 0.0
        self.last_update_step: int | None = None
        _leaves_at(config, self.schedule, 0)  # validate the config type before touching the model
        self._fqns = list(resolve(model, config))
        # Attach all-ones masks now so optimizers and state dicts see the final structure.
        modules = dict(model.named_modules())
        with attaching_masks(model):  # FSDP2 is told where the masked weights moved
            for fqn in self._fqns:
                weight = modules[fqn].weight
                set_mask(modules[fqn], torch.ones_like(weight, dtype=torch.bool), straight_through=straight_through)

    def step(self, step: int) -> bool:
        """Update the masks if the schedule's sparsity at `step` differs; True if it did."""
        target = self.schedule.sparsity_at(step, self._final_sparsity())
        update = not math.isclose(target, self.current_sparsity, abs_tol=1e-12)
        group = model_group(self.model)
        if group is not None:
            check_same_step(step, update, group[1])
        if not update:
            track(self.tracker, {"prune/sparsity": self.current_sparsity}, step)
            return False
        leaf = _leaves_at(self.config, self.schedule, step)
        if leaf is not None:
            plan(self.model, leaf, data=self.data, generator=self.generator).apply(self.model)
        log.info("step %d: sparsity %.4f -> %.4f", step, self.current_sparsity, target)
        self.current_sparsity, self.last_update_step = target, step
        track(self.tracker, {"prune/sparsity": target}, step)
        return True

    def _final_sparsity(self) -> float:
        if isinstance(self.config, PerLayer):
            return max((v.target_sparsity for v in self.config.rules.values() if v is not None), default=0.0)
        return self.config.target_sparsity  # type: ignore[attr-defined]

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume: masks (by tensor FQN), schedule position, RNG state."""
        return {
            "masks": mask_state_dict(self.model),
            "current_sparsity": self.current_sparsity,
            "last_update_step": self.last_update_step,
            "generator": self.generator.get_state(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore from `state_dict()` (mutates the model's masks)."""
        missing = {"masks", "current_sparsity", "last_update_step", "generator"} - set(state)
        if missing:
            raise CheckpointError(f"GradualPruner state is missing {sorted(missing)}")
        load_mask_state_dict(self.model, state["masks"])
        self.current_sparsity = float(state["current_sparsity"])
        self.last_update_step = state["last_update_step"]
        self.generator.set_state(state["generator"])
