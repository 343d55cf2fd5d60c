"""Whole pruning runs as YAML recipes: model and data entry points, method, schedule, fine-tuning.

A recipe names the user's code by "package.module:function" entry points (never pickles) and
holds configs that are validated field by field, so a misspelt key fails with its name.

Example recipe (YAML):

    _type: Recipe
    model: mypkg.models:build_model        # returns an nn.Module (weights trained or loaded)
    data: mypkg.data:loaders               # returns (train_loader, eval_loader)
    calibration: mypkg.data:calib_batches  # optional: batches for Wanda/SparseGPT criteria
    example_inputs: mypkg.data:example     # optional: what structured pruning traces with
                                           # (default: the first eval batch, cut to one sample)
    prune: {_type: UnstructuredConfig, sparsity: 0.9}
    schedule: {_type: Cubic, end_step: 2000, every: 100}
    finetune: {_type: FinetuneConfig, epochs: 3, lr: 0.001, alpha: 0.5}

The same recipe runs unchanged in one process or under `torchrun --nproc_per_node N`: then
every rank builds the model and computes the same masks (a calibration criterion sees batch i
on rank i % N, and the statistics are summed across ranks), the ranks check that they hold the
same pruned model, and rank 0 alone writes the output folder and the report.
"""

from __future__ import annotations

import copy
import importlib
import logging
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from pydantic import Field, field_validator
from torch import nn

from prunekit.allocation.search import SearchRecipe
from prunekit.config import FrozenConfig, Seed, recipe_type
from prunekit.core.collectives import collective_guard
from prunekit.core.criteria import get_criterion
from prunekit.core.distributed import collective_device, rank_and_world
from prunekit.core.masks import finalize
from prunekit.core.plan import plan
from prunekit.deploy.checkpoint import load, save
from prunekit.errors import ConfigError, PlanError, TraceError
from prunekit.measure.report import compare, write_report
from prunekit.recipes.launch import recipe_step, torchrun_process_group
from prunekit.storage.runstate import Checkpointer
from prunekit.structured import ChannelPlan, LLMPlan, LowRankPlan
from prunekit.train.distill import KDLoss, finetune
from prunekit.train.schedule import GradualPruner, Schedule

log = logging.getLogger(__name__)


@recipe_type
class FinetuneConfig(FrozenConfig):
    """Fine-tuning after (or during) pruning, distilling from the unpruned model when alpha > 0."""

    epochs: int = Field(default=1, ge=0)
    lr: float = Field(default=1e-3, gt=0)
    temperature: float = Field(default=4.0, gt=0)
    alpha: float = Field(default=0.5, ge=0, le=1)


@recipe_type
class Recipe(FrozenConfig):
    """One pruning run: what to prune, how, and how to recover."""

    model: str
    data: str | None = None
    calibration: str | None = None
    example_inputs: str | None = None
    checkpoint: str | None = None
    prune: FrozenConfig
    schedule: FrozenConfig | None = None
    finetune: FinetuneConfig | None = None
    seed: Seed = 0

    @field_validator("model", "data", "calibration", "example_inputs")
    @classmethod
    def _entry_point_form(cls, value: str | None) -> str | None:
        if value is not None and (value.count(":") != 1 or not all(value.split(":"))):
            raise ValueError(f"{value!r} is not an entry point of the form 'package.module:function'")
        return value


def load_entry_point(spec: str, what: str) -> Any:
    """Import "package.module:function" and call it; errors name the entry point."""
    module_name, _, attr = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise ConfigError(f"{what} entry point {spec!r}: cannot import {module_name!r} ({err})") from None
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise ConfigError(f"{what} entry point {spec!r}: {module_name!r} has no callable {attr!r}")
    try:
        return fn()
    except Exception as err:
        raise ConfigError(f"{what} entry point {spec!r} raised {type(err).__name__}: {err}") from err


def build(recipe: Recipe | SearchRecipe) -> tuple[nn.Module, Any, Any]:
    """Build a recipe's model (with its checkpoint loaded) and its data; nothing else is touched.

    The one place the `prune`, `sensitivity` and `search` commands turn entry points into
    objects, so they fail alike.

    Returns:
        (model, train_loader, eval_loader); both loaders are None when `recipe.data` is not set.

    Raises:
        ConfigError: an entry point fails, the model is not an `nn.Module`, or the data entry
            point does not return (train_loader, eval_loader).
    """
    model = load_entry_point(recipe.model, "model")
    if not isinstance(model, nn.Module):
        raise ConfigError(f"model entry point {recipe.model!r} returned {type(model).__name__}, not an nn.Module")
    if recipe.checkpoint:
        load(recipe.checkpoint, model)
    if not recipe.data:
        return model, None, None
    loaders = load_entry_point(recipe.data, "data")
    if not (isinstance(loaders, (tuple, list)) and len(loaders) == 2):
        raise ConfigError(f"data entry point {recipe.data!r} must return (train_loader, eval_loader)")
    return model, loaders[0], loaders[1]


STRUCTURED_PLANS = (ChannelPlan, LowRankPlan, LLMPlan)


def example_inputs_of(recipe: Recipe, *loaders: Any) -> Any:
    """What structured pruning traces the model with: `recipe.example_inputs` called, else the
    first batch of the first of `loaders` that has one, cut to one sample (None without data).

    A batch is `(inputs, targets)`, a mapping (its "labels" dropped), or the inputs themselves.
    """
    if recipe.example_inputs is not None:
        return load_entry_point(recipe.example_inputs, "example_inputs")
    for loader in loaders:
        batch = next(iter(loader), None) if loader is not None else None
        if batch is None:
            continue
        if isinstance(batch, (tuple, list)):
            batch = batch[0]
        elif isinstance(batch, dict):
            batch = {k: v for k, v in batch.items() if k != "labels"}
        return _first_sample(batch)
    return None


def _first_sample(inputs: Any) -> Any:
    if isinstance(inputs, torch.Tensor):
        return inputs[:1]
    if isinstance(inputs, dict):
        return {k: _first_sample(v) for k, v in inputs.items()}
    if isinstance(inputs, (tuple, list)):
        return type(inputs)(_first_sample(v) for v in inputs)
    return inputs


def calibration_share(recipe: Recipe) -> list[Any] | None:
    """This process's calibration batches: batch i of `recipe.calibration` on rank i % world (all in one process).

    Raises:
        ConfigError: the entry point fails, returns no batches, or fewer batches than ranks.
    """
    if recipe.calibration is None:
        return None
    batches = load_entry_point(recipe.calibration, "calibration")
    try:
        batches = [batches] if isinstance(batches, torch.Tensor) else list(batches)
    except TypeError:
        raise ConfigError(f"calibration entry point {recipe.calibration!r} must return batches (a list), "
                          f"got {type(batches).__name__}") from None
    rank, world = rank_and_world()
    if len(batches) < world:
        raise ConfigError(f"calibration entry point {recipe.calibration!r} gave {len(batches)} batches for {world} "
                          "ranks: under torchrun each rank calibrates on its own share, so give at least one per rank")
    return batches[rank::world]


def run_recipe(
    recipe: Recipe,
    out: str | Path,
    *,
    progress: bool = True,
    checkpoint_dir: str | Path | None = None,
    checkpoint_every: int = 100,
    resume: bool = False,
) -> dict[str, Any]:
    """Run `recipe`: build, prune (one-shot or gradually while fine-tuning), save, report.

    Under torchrun (WORLD_SIZE > 1) it starts the process group itself if none runs (see
    `prunekit.recipes.launch`), every rank prunes, and rank 0 alone writes `out`.

    Args:
        recipe: the run.
        out: folder for `pruned.safetensors` and the report.
        progress: show progress bars.
        checkpoint_dir: folder for the fine-tuning checkpoint (see `prunekit.finetune`),
            written every `checkpoint_every` steps and at each epoch's end. None: none.
        checkpoint_every: optimizer steps between checkpoints.
        resume: continue a killed run from `checkpoint_dir`; the pruned model is then
            bit-identical to an uninterrupted run's on CPU (the report's latencies are
            measured afresh).

    Returns:
        The report's data (`report.json`), or only the saved file's size without `recipe.data`;
        on ranks other than 0 under torchrun, an empty dict.

    Raises:
        ConfigError: a bad recipe, entry point or setting.
        PlanError: under torchrun, the ranks ended with different models.
        PrunekitError: under torchrun, a collective failed or timed out (names rank, step, op).
    """
    Checkpointer(checkpoint_dir, "finetune", checkpoint_every, resume)  # bad settings fail before any work
    saving: dict[str, Any] = {"checkpoint_dir": checkpoint_dir, "checkpoint_every": checkpoint_every, "resume": resume}
    with torchrun_process_group():
        return _run(recipe, Path(out), progress, saving)


def _run(recipe: Recipe, out: Path, progress: bool, saving: dict[str, Any]) -> dict[str, Any]:
    torch.manual_seed(recipe.seed)
    with recipe_step("build"):
        model, train, evaluate = build(recipe)
        calibration = calibration_share(recipe)
    baseline = copy.deepcopy(model).eval()
    tune = recipe.finetune
    structured: ChannelPlan | LowRankPlan | LLMPlan | None = None
    if (recipe.schedule is not None or tune is not None) and not recipe.data:
        raise ConfigError("recipe.schedule/finetune need training data: set recipe.data")
    if recipe.schedule is not None:
        if not isinstance(recipe.schedule, Schedule):
            raise ConfigError(f"recipe.schedule: {type(recipe.schedule).__name__} is not a schedule")
        pruner = GradualPruner(model, recipe.prune, recipe.schedule, seed=recipe.seed, data=calibration)
        tune = tune or FinetuneConfig()
        with recipe_step("finetune with gradual pruning"):
            finetune(model, train, epochs=tune.epochs, lr=tune.lr, teacher=baseline if tune.alpha else None,
                     kd=KDLoss(tune.temperature, tune.alpha), pruner=pruner, progress=progress, **saving)
    else:
        with recipe_step("prune"):
            planned = _plan(model, recipe, example_inputs_of(recipe, evaluate, train), calibration)
            planned.apply(model)
            if isinstance(planned, STRUCTURED_PLANS):  # saved with the file: `load(path, build_fn)` replays it
                structured = planned
        if tune is not None and tune.epochs:
            with recipe_step("finetune"):
                finetune(model, train, epochs=tune.epochs, lr=tune.lr, teacher=baseline if tune.alpha else None,
                         kd=KDLoss(tune.temperature, tune.alpha), progress=progress, **saving)
    finalize(model)
    check_same_model_on_ranks(model)
    if rank_and_world()[0] != 0:
        return {}
    saved = save(model, out / "pruned.safetensors", plan=structured)
    if evaluate is None:
        return {"pruned": {"size_bytes": saved.size_bytes, "file": saved.path.name}}
    report = compare(baseline, model, evaluate, seed=recipe.seed, title=f"prunekit: {recipe.model}")
    write_report(report, out)
    return report.data


def _plan(model: nn.Module, recipe: Recipe, example: Any, calibration: list[Any] | None) -> Any:
    """`plan` for the recipe; a missing input is named by the recipe field that gives it."""
    criterion = getattr(recipe.prune, "criterion", None)
    if calibration is None and isinstance(criterion, str) and get_criterion(criterion).needs_data:
        raise ConfigError(f"recipe.prune: criterion {criterion!r} needs calibration data: set recipe.calibration "
                          "to an entry point 'package.module:function' that returns a list of batches")
    try:
        return plan(model, recipe.prune, example, data=calibration)
    except TraceError as err:
        if example is None:
            raise ConfigError(f"recipe.prune: {type(recipe.prune).__name__} traces the model and the recipe gives "
                              "no input: set recipe.data (its first eval batch is used) or recipe.example_inputs"
                              ) from err
        source = "recipe.example_inputs" if recipe.example_inputs else "the first eval batch, cut to one sample"
        raise TraceError(f"recipe.prune: tracing the model on {source} ({_shapes(example)}) failed: {err}") from err


def _shapes(inputs: Any) -> str:
    """The shapes of the tensors in `inputs`, for an error message."""
    if isinstance(inputs, torch.Tensor):
        return f"shape {list(inputs.shape)}"
    if isinstance(inputs, dict):
        return ", ".join(f"{k}: {_shapes(v)}" for k, v in inputs.items())
    if isinstance(inputs, (tuple, list)):
        return ", ".join(_shapes(v) for v in inputs)
    return type(inputs).__name__


def check_same_model_on_ranks(model: nn.Module) -> None:
    """Raise on every rank unless all ranks hold the same parameters and buffers (a collective; reads only).

    Compares each tensor's float64 sum and sum of absolute values across ranks, exactly: ranks
    that pruned the same model with the same data agree bit for bit. Outside torchrun: nothing.

    Raises:
        PlanError: some tensors differ (names them): a rank-specific seed, model or data.
        PrunekitError: the all_gather failed or timed out (names rank, step and operation).
    """
    rank, world = rank_and_world()
    if world == 1:
        return
    state = model.state_dict()
    keys = sorted(state)
    rows = [[float(state[k].double().sum()), float(state[k].double().abs().sum())] for k in keys]
    mine = torch.tensor(rows or [[0.0, 0.0]], dtype=torch.float64, device=collective_device(None))
    gathered = [torch.empty_like(mine) for _ in range(world)]
    with collective_guard("all_gather (model checksums)", "check that every rank holds the same pruned model"):
        dist.all_gather(gathered, mine)
    differ = [keys[i] for i in range(len(keys)) if any(not torch.equal(g[i], gathered[0][i]) for g in gathered)]
    if differ:
        raise PlanError(f"rank {rank} of {world}: the ranks hold different pruned models ({differ[:5]} differ): "
                        "a rank-specific seed, model or data? Every rank must build and prune the same model")
