"""Iterative structured pruning: remove a little, fine-tune (with distillation), repeat.

Removing 10 % per round and recovering in between keeps each step's damage small enough for
fine-tuning to repair (Li et al. 2017, "Pruning Filters for Efficient ConvNets", iterative
schedule; Hinton et al. 2015 for the distillation from the dense teacher).
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable, Iterable
from typing import Any

from torch import Tensor, nn

from prunekit.distill import KDLoss, finetune
from prunekit.errors import ConfigError
from prunekit.plan import plan as make_plan
from prunekit.structured.config import ChannelConfig
from prunekit.structured.plan import ChannelPlan

log = logging.getLogger(__name__)


def prune_iteratively(
    model: nn.Module,
    config: ChannelConfig,
    example_inputs: Any,
    loader: Iterable[tuple[Tensor, Tensor]],
    *,
    rounds: int = 5,
    epochs: int = 1,
    lr: float = 1e-3,
    teacher: nn.Module | None = None,
    kd: KDLoss | None = None,
    callback: Callable[[int, nn.Module, ChannelPlan], None] | None = None,
    progress: bool = False,
) -> tuple[nn.Module, list[ChannelPlan]]:
    """Prune `model` to `config.ratio` in `rounds` equal steps, fine-tuning after each (mutates).

    Each round removes the same fraction of what is left, so that after `rounds` rounds the
    groups have lost `config.ratio` of their units: r = 1 - (1 - ratio) ** (1 / rounds).

    Args:
        model: the model; it is pruned and trained in place and returned.
        config: the final ratio and criterion; `ratio` is reached after the last round.
        example_inputs: inputs to trace with.
        loader: `(x, y)` training batches for fine-tuning.
        rounds: prune-then-fine-tune rounds.
        epochs: fine-tuning epochs per round.
        lr: Adam learning rate for fine-tuning (a fresh optimizer each round, since the
            parameters change shape).
        teacher: a frozen model to distil from (typically the dense model); None: labels only.
        kd: the distillation loss; default `KDLoss(alpha=0.5)` with a teacher.
        callback: called as `callback(round, model, plan)` after each round's fine-tuning.
        progress: show progress bars while fine-tuning.

    Returns:
        The model and the plan of each round (replay them in order to rebuild it).

    Example:
        >>> model, plans = prune_iteratively(model, ChannelConfig(ratio=0.5), x, loader)  # doctest: +SKIP
    """
    if rounds < 1:
        raise ConfigError(f"prune_iteratively.rounds must be >= 1, got {rounds}")
    step = 1.0 - (1.0 - config.ratio) ** (1.0 / rounds)
    heads = None if config.head_ratio is None else 1.0 - (1.0 - config.head_ratio) ** (1.0 / rounds)
    per_round = config.model_copy(update={"ratio": step, "head_ratio": heads})
    teacher = copy.deepcopy(teacher).eval() if teacher is not None else None
    plans = []
    for r in range(rounds):
        plan = make_plan(model, per_round, example_inputs)
        plan.apply(model)
        plans.append(plan)
        log.info("round %d/%d: %s", r + 1, rounds, plan.summary().splitlines()[-1])
        finetune(model, loader, epochs=epochs, lr=lr, teacher=teacher, kd=kd, progress=progress)
        if callback is not None:
            callback(r, model, plan)
    return model, plans
