"""Whole pruning runs as YAML recipes: model and data entry points, method, schedule, fine-tuning.

A recipe names the user's code by "package.module:function" entry points (never pickles) and
holds configs that are validated field by field, so a misspelt key fails with its name.

Example recipe (YAML):

    _type: Recipe
    model: mypkg.models:build_model        # returns an nn.Module (weights trained or loaded), or a
                                           # Hugging Face causal LM folder (safetensors)
    data: mypkg.data:loaders               # returns (train_loader, eval_loader); for a language
                                           # model (train batches of token ids, held-out ids or
                                           # {segment: ids}), and the report speaks in perplexity
    calibration: 8                         # Wanda/SparseGPT batches: the first 8 training batches,
                                           # or an entry point returning a list of batches
    example_inputs: mypkg.data:example     # optional: what structured pruning and export trace with
                                           # (default: the first eval batch, cut to one sample)
    max_memory: 8GB                        # optional: calibration passes refuse up front above it
    allocate:                              # optional: per-layer levels from a sensitivity scan
      target: {_type: LatencyTarget, speedup: 1.5}
    prune: {_type: UnstructuredConfig, sparsity: 0.9}
    schedule: {_type: Cubic, end_step: 2000, every: 100}
    finetune: {_type: FinetuneConfig, epochs: 3, lr: 0.001, alpha: 0.5}
    quantize: {_type: DynamicInt8Config}   # optional: INT8 stacked on the pruned model
    export: {_type: ExportStage}           # optional: model.onnx, checked against the model
    report: {_type: ReportSettings, batch_sizes: [1, 8]}

Stages run in this order: build, allocate, prune (with fine-tuning when a schedule is given),
fine-tune (`finetune`, or `recover` for a language model), quantize, save, export, report.

The same recipe runs unchanged in one process or under `torchrun --nproc_per_node N`: then
every rank builds the model and computes the same masks (a calibration criterion sees batch i
on rank i % N, and the statistics are summed across ranks), the ranks check that they hold the
same pruned model, and rank 0 alone writes the output folder and the report.
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from pydantic import Field, field_validator
from torch import nn

from prunekit.allocation.search import SearchRecipe
from prunekit.config import FrozenConfig, MaskConfig, Seed, recipe_type
from prunekit.core.collectives import collective_guard
from prunekit.core.criteria import get_criterion
from prunekit.core.distributed import collective_device, rank_and_world
from prunekit.core.masks import finalize
from prunekit.core.plan import plan
from prunekit.core.tracking import Tracker, log_report_headline
from prunekit.deploy.checkpoint import save
from prunekit.deploy.quantize import quantize
from prunekit.errors import ConfigError, PlanError, TraceError
from prunekit.measure.lm_report import as_segments, compare_lm
from prunekit.measure.report import Report, compare
from prunekit.recipes.entry import (
    calibration_batches,
    first_batch,
    first_sample,
    is_entry_point,
    load_data,
    load_entry_point,
    load_model,
    shapes,
)
from prunekit.recipes.launch import recipe_step, torchrun_process_group
from prunekit.recipes.stages import (
    AllocateStage,
    ExportStage,
    ReportSettings,
    allocated_config,
    export_model,
    int8_block,
    int8_verdict,
    is_text,
)
from prunekit.storage.runstate import Checkpointer
from prunekit.structured import ChannelConfig, ChannelPlan, LLMPlan, LowRankPlan
from prunekit.train.distill import KDLoss, finetune
from prunekit.train.iterative import prune_iteratively
from prunekit.train.recovery import RecoveryConfig, recover
from prunekit.train.schedule import GradualPruner, Iterative, Schedule

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
    """One pruning run: what to prune, how, and how to recover (see the module docstring)."""

    model: str
    data: str | None = None
    calibration: str | int | None = None
    example_inputs: str | None = None
    checkpoint: str | None = None
    max_memory: int | str | None = None
    allocate: AllocateStage | None = None
    prune: FrozenConfig
    schedule: FrozenConfig | None = None
    finetune: FinetuneConfig | None = None
    recover: RecoveryConfig | None = None
    quantize: FrozenConfig | None = None
    export: ExportStage | None = None
    report: ReportSettings = ReportSettings()
    seed: Seed = 0

    @field_validator("data", "example_inputs")
    @classmethod
    def _entry_point_form(cls, value: str | None) -> str | None:
        if value is not None and not is_entry_point(value):
            raise ValueError(f"{value!r} is not an entry point of the form 'package.module:function'")
        return value

    @field_validator("model")
    @classmethod
    def _model_form(cls, value: str) -> str:
        if ":" in value and not is_entry_point(value):
            raise ValueError(f"{value!r} is not an entry point of the form 'package.module:function' "
                             "(nor a folder path without ':')")
        return value

    @field_validator("calibration")
    @classmethod
    def _calibration_form(cls, value: str | int | None) -> str | int | None:
        if isinstance(value, int) and value < 1:
            raise ValueError(f"a number of training batches must be >= 1, got {value}")
        if isinstance(value, str) and not is_entry_point(value):
            raise ValueError(f"{value!r} is neither a number of training batches nor an entry point "
                             "'package.module:function'")
        return value


def build(recipe: Recipe | SearchRecipe) -> tuple[nn.Module, Any, Any]:
    """Build a recipe's model (with its checkpoint loaded) and its data; nothing else is touched.

    Returns:
        (model, train, eval); both are None when `recipe.data` is not set.

    Raises:
        ConfigError: an entry point fails, the model is not an `nn.Module`, or the data entry
            point does not return (train, eval).
    """
    model = load_model(recipe.model, recipe.checkpoint)
    if not recipe.data:
        return model, None, None
    train, evaluate = load_data(recipe.data)
    return model, train, evaluate


STRUCTURED_PLANS = (ChannelPlan, LowRankPlan, LLMPlan)


def example_inputs_of(recipe: Recipe, evaluate: Any, train: Any) -> Any:
    """What structured pruning and export trace with: `recipe.example_inputs` called, else the
    first eval (or training) batch cut to one sample, else one window of held-out text."""
    if recipe.example_inputs is not None:
        return load_entry_point(recipe.example_inputs, "example_inputs")
    batch = first_batch(evaluate, train)
    if batch is not None:
        return first_sample(batch)
    if is_text(evaluate):
        ids = next(iter(as_segments(evaluate, recipe.report.seq_len).values()))
        return ids[: recipe.report.seq_len].unsqueeze(0)
    return None


def run_recipe(
    recipe: Recipe,
    out: str | Path,
    *,
    progress: bool = True,
    checkpoint_dir: str | Path | None = None,
    checkpoint_every: int = 100,
    resume: bool = False,
    tracker: Tracker | None = None,
) -> dict[str, Any]:
    """Run `recipe`: build, allocate, prune (one-shot, gradually or iteratively while fine-tuning),
    fine-tune, quantize, save, export, report.

    Under torchrun (WORLD_SIZE > 1) it starts the process group itself if none runs (see
    `prunekit.recipes.launch`), every rank prunes, and rank 0 alone writes `out`.

    Args:
        recipe: the run.
        out: folder for `pruned.safetensors`, the report and the stages' files.
        progress: show progress bars.
        checkpoint_dir: folder for the fine-tuning checkpoint (see `prunekit.finetune`),
            written every `checkpoint_every` steps and at each epoch's end. None: none.
        checkpoint_every: optimizer steps between checkpoints.
        resume: continue a killed run from `checkpoint_dir`; the pruned model is then
            bit-identical to an uninterrupted run's on CPU (the report's latencies are
            measured afresh).
        tracker: logs per-step loss, learning rate and sparsity of the training stages, and the
            report's headline numbers (`prunekit.core.tracking`).

    Returns:
        The report's data (`report.json`) with the stages' wall times and files, or only the
        saved file's size without eval data; on ranks other than 0 under torchrun, an empty dict.

    Raises:
        ConfigError: a bad recipe, entry point or setting; a stage that needs data has none
            (names the stage and the field to set).
        PlanError: under torchrun, the ranks ended with different models.
        PrunekitError: under torchrun, a collective failed or timed out (names rank, step, op).
    """
    Checkpointer(checkpoint_dir, "finetune", checkpoint_every, resume)  # bad settings fail before any work
    saving: dict[str, Any] = {"checkpoint_dir": checkpoint_dir, "checkpoint_every": checkpoint_every, "resume": resume}
    with torchrun_process_group():
        return _Run(recipe, Path(out), progress, saving, tracker).run()


class _Run:
    """One recipe run, stage by stage; `times` holds each stage's wall seconds."""

    def __init__(self, recipe: Recipe, out: Path, progress: bool, saving: dict[str, Any],
                 tracker: Tracker | None = None) -> None:
        self.recipe, self.out, self.progress, self.saving, self.tracker = recipe, out, progress, saving, tracker
        self.times: dict[str, float] = {}
        self.files: dict[str, Any] = {}
        self.structured: Any = None
        self.text = False  # the eval data is held-out token ids (a language model's run)

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        with recipe_step(name):
            yield
        self.times[name] = round(time.perf_counter() - start, 3)
        log.info("recipe stage %s: %.1f s", name, self.times[name])

    def run(self) -> dict[str, Any]:
        recipe = self.recipe
        torch.manual_seed(recipe.seed)
        with self.stage("build"):
            model, train, evaluate = build(recipe)
            self.text = is_text(evaluate)
            check_stage_data(recipe, train, evaluate, self.text)
            calibration = None if recipe.calibration is None else calibration_batches(recipe.calibration, train)
            example = example_inputs_of(recipe, evaluate, train)
        baseline = copy.deepcopy(model).eval()
        config: FrozenConfig | ChannelPlan = recipe.prune
        if recipe.allocate is not None:
            with self.stage("allocate"):
                config = allocated_config(model, recipe.prune, recipe.allocate, evaluate, example=example,
                                          calibration=calibration, seq_len=recipe.report.seq_len, out=self.out,
                                          progress=self.progress)
                self.files["allocation"] = "allocation.json" if isinstance(config, ChannelPlan) else "allocation.yaml"
        self.prune(model, config, train, example, calibration, baseline)
        finalize(model)
        check_same_model_on_ranks(model)
        final = model
        if recipe.quantize is not None:
            with self.stage("quantize"):
                final = quantize(model, recipe.quantize, data=calibration or _batches(evaluate, 8),
                                 example_inputs=example)
        if rank_and_world()[0] != 0:
            return {}
        with self.stage("save"):
            saved = save(model, self.out / "pruned.safetensors", plan=self.structured)
        if recipe.export is not None:
            with self.stage("export"):
                self.files.update(export_model(final, model, recipe.export, example, evaluate, self.out))
        if evaluate is None:
            return {"pruned": {"size_bytes": saved.size_bytes, "file": saved.path.name}, "stages_s": self.times}
        with self.stage("report"):
            report = self.report(baseline, model, evaluate)
            if final is not model:
                block = int8_block(baseline, final, evaluate, example, self.out, seq_len=recipe.report.seq_len,
                                   repeats=min(recipe.report.repeats, 20))
                report.data["pruned_int8"] = block
                report.data["verdicts"].insert(1, int8_verdict(block, report.data["baseline"]["size_bytes"]))
        report.data["stages_s"], report.data["files"] = self.times, {"pruned": saved.path.name, **self.files}
        report.data.setdefault("sections", []).append(_stages_section(self.times, self.files))
        report.save(self.out)
        if self.tracker is not None:
            log_report_headline(self.tracker, report)
        return report.data

    def prune(self, model: nn.Module, config: FrozenConfig | ChannelPlan, train: Any, example: Any, calibration: Any,
              baseline: nn.Module) -> None:
        """Prune `model` (mutates): gradually or iteratively while fine-tuning, or one-shot, then
        fine-tune or recover as the recipe says."""
        recipe, tune = self.recipe, self.recipe.finetune or FinetuneConfig()
        teacher, kd = (baseline if tune.alpha else None), KDLoss(tune.temperature, tune.alpha)
        saving = self.saving
        if isinstance(config, ChannelPlan) and recipe.schedule is not None:
            raise ConfigError("recipe.allocate chose a ratio per channel group, which prunes in one shot: drop "
                              "recipe.schedule (recipe.finetune still fine-tunes afterwards)")
        if isinstance(recipe.schedule, Iterative) and isinstance(config, ChannelConfig):
            with self.stage("prune iteratively with fine-tuning"):
                _, self.structured = prune_iteratively(
                    model, config, _traced(example, recipe), train, rounds=len(recipe.schedule.steps),
                    epochs=tune.epochs, lr=tune.lr, teacher=teacher, kd=kd, progress=self.progress,
                    checkpoint_dir=saving["checkpoint_dir"], checkpoint_every=saving["checkpoint_every"],
                    resume=saving["resume"])
            return
        if recipe.schedule is not None and not isinstance(config, ChannelPlan):
            if not isinstance(recipe.schedule, Schedule):
                raise ConfigError(f"recipe.schedule: {type(recipe.schedule).__name__} is not a schedule")
            pruner = GradualPruner(model, config, recipe.schedule, seed=recipe.seed, data=calibration,
                                   tracker=self.tracker)
            with self.stage("finetune with gradual pruning"):
                finetune(model, train, epochs=tune.epochs, lr=tune.lr, teacher=teacher, kd=kd, pruner=pruner,
                         progress=self.progress, tracker=self.tracker, **saving)
            return
        with self.stage("prune"):
            planned = config if isinstance(config, ChannelPlan) else _plan(model, config, recipe, example, calibration)
            planned.apply(model)
            if isinstance(planned, STRUCTURED_PLANS):  # saved with the file: `load(path, build_fn)` replays it
                self.structured = planned
        if recipe.finetune is not None and tune.epochs:
            with self.stage("finetune"):
                finetune(model, train, epochs=tune.epochs, lr=tune.lr, teacher=teacher, kd=kd,
                         progress=self.progress, tracker=self.tracker, **saving)
        if recipe.recover is not None:
            with self.stage("recover"):
                recover(model, baseline, train, recipe.recover, progress=self.progress, tracker=self.tracker,
                        checkpoint_dir=self.saving["checkpoint_dir"], resume=self.saving["resume"])

    def report(self, baseline: nn.Module, final: nn.Module, evaluate: Any) -> Report:
        settings, title = self.recipe.report, f"prunekit: {self.recipe.model}"
        if self.text:
            return compare_lm(baseline, final, evaluate, seq_len=settings.seq_len, prompt_tokens=settings.prompt_tokens,
                              decode_tokens=settings.decode_tokens, repeats=min(settings.repeats, 10),
                              precision=settings.precision, seed=self.recipe.seed, title=title)
        return compare(baseline, final, evaluate, batch_sizes=settings.batch_sizes, repeats=settings.repeats,
                       seed=self.recipe.seed, title=title)


def check_stage_data(recipe: Recipe, train: Any, evaluate: Any, text: bool) -> None:
    """Refuse, before any work, a stage that needs data the recipe does not give (names both)."""
    needs_train = [name for name, value in (("schedule", recipe.schedule), ("finetune", recipe.finetune),
                                            ("recover", recipe.recover)) if value is not None]
    if needs_train and train is None:
        raise ConfigError(f"recipe.{needs_train[0]} trains the model and the recipe has no training data: set "
                          "recipe.data to an entry point returning (train, eval)")
    if recipe.finetune is not None and text:
        raise ConfigError("recipe.finetune trains a classifier on (inputs, labels); for a language model "
                          "(eval data is token ids) use recipe.recover (distillation by token budget)")
    if recipe.recover is not None and not text:
        raise ConfigError("recipe.recover distils a language model on token ids; for (inputs, labels) "
                          "loaders use recipe.finetune")
    if recipe.allocate is not None and evaluate is None:
        raise ConfigError("recipe.allocate scores each unit on held-out data and the recipe has none: set "
                          "recipe.data to an entry point returning (train, eval)")


def _batches(loader: Any, n: int) -> list[Any] | None:
    if loader is None or is_text(loader):
        return None
    return [b for _, b in zip(range(n), loader, strict=False)]


def _traced(example: Any, recipe: Recipe) -> Any:
    if example is None:
        raise ConfigError(f"recipe.prune: {type(recipe.prune).__name__} traces the model and the recipe gives "
                          "no input: set recipe.data (its first eval batch is used) or recipe.example_inputs")
    return example


def _stages_section(times: dict[str, float], files: dict[str, Any]) -> dict[str, str]:
    rows = ["| stage | wall s |", "|---|---|", *[f"| {name} | {s:.1f} |" for name, s in times.items()]]
    for name, info in files.items():
        rows.append(f"\n{name}: {info}")
    return {"title": "Recipe stages", "markdown": "\n".join(rows)}


def _plan(model: nn.Module, config: FrozenConfig, recipe: Recipe, example: Any, calibration: list[Any] | None) -> Any:
    """`plan` for the recipe; a missing input is named by the recipe field that gives it."""
    criterion = getattr(config, "criterion", None) if isinstance(config, MaskConfig) else None
    if calibration is None and isinstance(criterion, str) and get_criterion(criterion).needs_data:
        raise ConfigError(f"recipe.prune: criterion {criterion!r} needs calibration data: set recipe.calibration "
                          "to a number of training batches or an entry point 'package.module:function' that "
                          "returns a list of batches")
    try:
        return plan(model, config, example, data=calibration, max_memory=recipe.max_memory)
    except TraceError as err:
        if example is None:
            raise ConfigError(f"recipe.prune: {type(config).__name__} traces the model and the recipe gives "
                              "no input: set recipe.data (its first eval batch is used) or recipe.example_inputs"
                              ) from err
        source = "recipe.example_inputs" if recipe.example_inputs else "the first eval batch, cut to one sample"
        raise TraceError(f"recipe.prune: tracing the model on {source} ({shapes(example)}) failed: {err}") from err


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
