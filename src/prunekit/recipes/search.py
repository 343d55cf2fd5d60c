"""The `prunekit search` command's runner: build a `SearchRecipe`, run the study, write the best rules.

The library piece is `prunekit.search`; this module only turns the recipe's entry points into
a model and loaders and the study's best trial into `best_recipe.yaml`.
"""

from __future__ import annotations

from pathlib import Path

import torch

from prunekit.allocation.search import SearchRecipe, SearchResult, search
from prunekit.config import MaskConfig, save_recipe
from prunekit.core.tracking import Tracker
from prunekit.errors import ConfigError
from prunekit.recipes.run import build
from prunekit.train.distill import accuracy


def run_search_recipe(recipe: SearchRecipe, out: str | Path, *, storage: str | None = None,
                      trials: int | None = None, tracker: Tracker | None = None) -> SearchResult:
    """Build the recipe's model and data, run `search`, write `best_recipe.yaml` to `out`.

    Args:
        recipe: the search; `recipe.prune` must be a mask config (it has a sparsity to vary).
        out: folder for `best_recipe.yaml` and, without another storage, `search.db`.
        storage: Optuna storage URL overriding `recipe.storage`.
        trials: finished trials wanted, overriding `recipe.search.trials`.
        tracker: logs each trial's measured objectives (`prunekit.core.tracking`).
    """
    model, train, held_out = build(recipe)
    if not isinstance(recipe.prune, MaskConfig):
        kind = type(recipe.prune).__name__
        raise ConfigError(f"SearchRecipe.prune must be a mask config (with a sparsity), got {kind}")
    config = recipe.search if trials is None else recipe.search.model_copy(update={"trials": trials})
    url = storage or recipe.storage or f"sqlite:///{Path(out) / 'search.db'}"
    Path(out).mkdir(parents=True, exist_ok=True)
    result = search(model, recipe.prune, train, lambda m: accuracy(m, held_out), torch.zeros(recipe.input_shape),
                    config, storage=url, tracker=tracker)
    if result.best:
        save_recipe(result.best_config(recipe.prune), Path(out) / "best_recipe.yaml")
    return result
