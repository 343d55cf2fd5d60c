"""Iterative structured pruning: remove a little, fine-tune (with distillation), repeat.

Removing 10 % per round and recovering in between keeps each step's damage small enough for
fine-tuning to repair (Li et al. 2017, "Pruning Filters for Efficient ConvNets", iterative
schedule; Hinton et al. 2015 for the distillation from the dense teacher).
"""

from __future__ import annotations

import copy
import json
import logging
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from prunekit.config import config_to_dict
from prunekit.core.plan import plan as make_plan
from prunekit.errors import CheckpointError, ConfigError
from prunekit.storage.runstate import Checkpointer, check_same_run, loader_generators, rng_state, set_rng_state
from prunekit.structured.config import ChannelConfig
from prunekit.structured.plan import ChannelPlan
from prunekit.train.distill import KDLoss, TrainLoop

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
    checkpoint_dir: str | Path | None = None,
    checkpoint_every: int = 100,
    resume: bool = False,
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
        checkpoint_dir: folder for `iterative.ckpt.safetensors`, written atomically after
            each round and every `checkpoint_every` fine-tuning steps within one: the plans
            applied so far, the weights, the optimizer, the loader position and the RNG
            states. None: no checkpoints.
        checkpoint_every: fine-tuning steps between checkpoints within a round.
        resume: continue from the checkpoint in `checkpoint_dir` if there is one; pass the
            same dense `model` (and seeds) as the first run: the saved plans are replayed on
            it, so the result is bit-identical to an uninterrupted run on CPU. `callback` is not
            called again for rounds that ended before the interruption.

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
    saver = Checkpointer(checkpoint_dir, "iterative", checkpoint_every, resume)
    run = {"rounds": rounds, "epochs": epochs, "lr": lr, "config": config_to_dict(config)}
    saved, plans, start = saver.load(), [], 0
    if saved is not None:
        check_same_run(saved["run"], run, "prune_iteratively")
        plans = [ChannelPlan.from_dict(json.loads(p)) for p in saved["plans"]]
        for plan in plans:  # rebuild the pruned shapes on the dense model, then its weights
            plan.apply(model)
        start = saved["round"]
        if saved["finetune"] is None:
            _load_weights(model, saved["model"])
            set_rng_state(saved["rng"], loader_generators(loader))
    for r in range(start, rounds):
        tuning = saved["finetune"] if saved is not None and r == start else None
        if tuning is None:
            plan = make_plan(model, per_round, example_inputs)
            plan.apply(model)
            plans.append(plan)
            log.info("round %d/%d: %s", r + 1, rounds, plan.summary().splitlines()[-1])
        encoded = [json.dumps(p.to_dict()) for p in plans]

        def save_round(state: dict[str, Any], r: int = r, encoded: list[str] = encoded) -> None:
            saver.save({"run": run, "round": r, "plans": encoded, "finetune": state})

        loop = TrainLoop(model, loader, torch.optim.Adam(model.parameters(), lr=lr),
                         kd or KDLoss(alpha=0.5 if teacher is not None else 0.0), teacher)
        loop.run(epochs, 0, None, progress, saved=tuning, save=save_round if saver.enabled else None,
                 every=checkpoint_every)
        if callback is not None:
            callback(r, model, plans[-1])
        saver.save({"run": run, "round": r + 1, "plans": encoded, "finetune": None, "model": model.state_dict(),
                    "rng": rng_state(loader_generators(loader))})
    return model, plans


def _load_weights(model: nn.Module, state: dict[str, Tensor]) -> None:
    try:
        model.load_state_dict(state)
    except RuntimeError as err:
        raise CheckpointError(f"prune_iteratively: the checkpoint's weights do not fit the model: {err}") from None
