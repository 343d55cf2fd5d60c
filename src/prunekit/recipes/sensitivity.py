"""The `prunekit sensitivity` command's runner: scan a recipe's model, then optionally allocate.

The recipe's `prune` config is the family scanned; its `data` entry point gives the held-out
loader the metric runs on. The library pieces are `prunekit.sensitivity` and `prunekit.allocate`.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Literal

import torch

from prunekit.allocation.allocate import Target, allocate
from prunekit.allocation.sensitivity import proxy_loss, sensitivity
from prunekit.config import save_recipe
from prunekit.core.distributed import is_main_rank
from prunekit.core.tracking import Tracker
from prunekit.errors import ConfigError, PrunekitError
from prunekit.recipes.entry import calibration_batches
from prunekit.recipes.run import Recipe, build, example_inputs_of
from prunekit.train.distill import accuracy

log = logging.getLogger(__name__)


def run_sensitivity_recipe(
    recipe: Recipe,
    out: str | Path,
    *,
    levels: list[float],
    metric: Literal["accuracy", "loss"] = "accuracy",
    loss_batches: int = 4,
    input_shape: tuple[int, ...] | None = None,
    target: Target | None = None,
    progress: bool = True,
    tracker: Tracker | None = None,
) -> dict[str, Any]:
    """Scan `recipe.model` with `recipe.prune` as the family; write the table, heat map, allocation.

    Writes `sensitivity.json`, `sensitivity.png` (if matplotlib is installed) and, with a
    target, `allocation.yaml`: `PerLayer` rules for `prunekit prune`. The model is built
    afresh and ends unchanged. Returns the table, the allocation (or None) and the paths.
    """
    out = Path(out)
    model, train, held_out = build(recipe)
    if not recipe.data:
        raise ConfigError("prunekit sensitivity needs recipe.data: an entry point returning (train, eval) loaders")
    calibration = None if recipe.calibration is None else calibration_batches(recipe.calibration, train)
    if metric == "accuracy":
        evaluate, higher = (lambda m: accuracy(m, held_out)), True
    else:
        evaluate, higher = proxy_loss(held_out, n_batches=loss_batches), False
    inputs = torch.zeros(input_shape) if input_shape else example_inputs_of(recipe, held_out, train)
    table = sensitivity(model, recipe.prune, evaluate, levels, higher_is_better=higher, example_inputs=inputs,
                        data=calibration, progress=progress, max_memory=recipe.max_memory, tracker=tracker)
    allocation = allocate(table, target) if target is not None else None
    if not is_main_rank():  # under torchrun every rank holds the same merged table; rank 0 writes it
        return {"table": table, "allocation": allocation, "files": {}}
    written = {"table": table.save(out / "sensitivity.json")}
    try:
        written["plot"] = table.plot(out / "sensitivity.png")
    except PrunekitError as err:  # matplotlib missing: the table is still the result
        log.warning("%s", err)
    if allocation is not None:
        written["allocation"] = save_recipe(allocation.to_config(recipe.prune), out / "allocation.yaml")
    return {"table": table, "allocation": allocation, "files": written}
