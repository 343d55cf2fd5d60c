"""`prunekit report`, `check`, `sensitivity`, `search`, `bundle` and `device-table`: the commands that
measure a model, gate it on a budget, or allocate sparsity with what was measured."""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Annotated

import torch
import typer
from torch import nn

from prunekit.allocation.allocate import SparsityTarget
from prunekit.allocation.bundle import make_bundle
from prunekit.allocation.device_table import load_device_table
from prunekit.allocation.search import SearchRecipe
from prunekit.cli.support import TrackOption, fail, floats, main_process, one_process, resolve_inputs, tracking
from prunekit.config import load_recipe
from prunekit.core.tracking import log_report_headline
from prunekit.deploy.checkpoint import load
from prunekit.errors import ConfigError, PrunekitError
from prunekit.measure.cost import CostQuery
from prunekit.measure.gate import check_report, load_budget, load_report
from prunekit.measure.report import compare, write_report
from prunekit.measure.segments import Segments
from prunekit.recipes.entry import is_entry_point, load_entry_point
from prunekit.recipes.launch import torchrun_process_group
from prunekit.recipes.run import Recipe
from prunekit.recipes.search import run_search_recipe
from prunekit.recipes.sensitivity import run_sensitivity_recipe
from prunekit.storage.files import read_document
from prunekit.structured import ChannelConfig


def report(
    model: Annotated[str, typer.Option(help="Entry point 'module:function' that builds the (dense) model.")],
    data: Annotated[str, typer.Option(help="Entry point 'module:function' returning (train_loader, eval_loader).")],
    baseline: Annotated[Path, typer.Option(help="Checkpoint of the baseline (prunekit.save).")],
    pruned: Annotated[Path, typer.Option(help="Checkpoint of the pruned model (prunekit.save).")],
    out: Annotated[Path, typer.Option(help="Folder for report.json, report.md and report.html.")] = Path("out/report"),
    batch_sizes: Annotated[str, typer.Option(help="Batch sizes to time, comma-separated.")] = "1,4,8,32",
    repeats: Annotated[int, typer.Option(help="Timed calls per model and batch size (interleaved).")] = 50,
    warmup: Annotated[int, typer.Option(help="Untimed calls per model and batch size first.")] = 10,
    threads: Annotated[int, typer.Option(help="torch threads while measuring (0: keep torch's default).")] = 0,
    retain_memory: Annotated[bool, typer.Option(
        help="Keep freed memory mapped while timing, as jemalloc/tcmalloc would (--no-retain-memory: glibc's "
             "default, which page-faults large activations back on every call).")] = True,
    segments: Annotated[str, typer.Option(
        help="Accuracy per segment besides per class: an entry point 'module:function' returning a function "
             "of one example's input (its segment name) or the names, or a text file with one segment name "
             "per evaluation example, in the data's order.")] = "",
    qps: Annotated[float | None, typer.Option(
        help="Project serving cost at this target QPS: hosts dense vs pruned from the measured latency.")] = None,
    serving_batch: Annotated[int | None, typer.Option(
        help="Batch size served (with --qps); must be one of --batch-sizes.")] = None,
    price_per_host_hour: Annotated[float | None, typer.Option(
        help="Price of one host for one hour (with --qps): adds the yearly cost.")] = None,
    track: TrackOption = "",
) -> None:
    """Measure a pruned checkpoint against its baseline and write the validation report.

    With --qps and --serving-batch it adds the serving cost (hosts, and yearly cost with
    --price-per-host-hour), the formula shown with the measured numbers.
    """
    one_process("report", "it measures latency, which other processes on the machine would disturb")
    try:
        sizes = [int(v) for v in floats(batch_sizes, "--batch-sizes")]
        if not sizes or min(sizes) < 1 or repeats < 1 or warmup < 0 or threads < 0:
            raise PrunekitError(f"--batch-sizes must be positive integers, --repeats >= 1, --warmup and "
                                f"--threads >= 0; got {batch_sizes!r}, {repeats}, {warmup}, {threads}")
        cost = _cost_query(qps, serving_batch, price_per_host_hour)
        with tracking(track) as tracker:  # a bad spec fails here, before anything is measured
            if cost is not None and cost.serving_batch not in sizes:
                raise ConfigError(f"--serving-batch {cost.serving_batch} is not among --batch-sizes {batch_sizes!r}: "
                                  "the cost is projected from measured latency only; add it to --batch-sizes")
            if threads:
                torch.set_num_threads(threads)  # the report records the thread count it ran with
            build = partial(load_entry_point, model, "model")
            dense, small = load(baseline, build()), load(pruned, build)
            _, evaluate = load_entry_point(data, "data")
            result = compare(dense, small, evaluate, batch_sizes=sizes, repeats=repeats, warmup=warmup,
                             retain_memory=retain_memory, title=f"prunekit report: {pruned.name} vs {baseline.name}",
                             segments=_report_segments(segments) if segments else None, cost=cost)
            write_report(result, out)
            if tracker is not None:
                log_report_headline(tracker, result)
    except PrunekitError as err:
        fail(err)
        return
    typer.echo(result.summary())
    typer.echo(f"report: {out / 'report.html'}")


def _cost_query(qps: float | None, serving_batch: int | None, price: float | None) -> CostQuery | None:
    """`report --qps/--serving-batch/--price-per-host-hour` as a `CostQuery` (None without --qps)."""
    if qps is None:
        if serving_batch is not None or price is not None:
            raise ConfigError("--serving-batch and --price-per-host-hour need --qps (the target rate to size for)")
        return None
    if serving_batch is None:
        raise ConfigError("--qps needs --serving-batch: the batch size served, one of --batch-sizes")
    for option, value in (("--qps", qps), ("--serving-batch", serving_batch), ("--price-per-host-hour", price)):
        if value is not None and not value > 0:
            raise ConfigError(f"{option} must be positive, got {value}")
    return CostQuery(qps=qps, serving_batch=serving_batch, price_per_host_hour=price)


def _report_segments(spec: str) -> Segments:
    """`report --segments`: a text file of one name per example, or an entry point returning a
    segment function or the names."""
    if Path(spec).is_file() or not is_entry_point(spec):
        lines = read_document(spec, "--segments file", ConfigError).splitlines()
        names = [line.strip() for line in lines]
        while names and not names[-1]:
            names.pop()  # a trailing newline (or several) is not an example
        if not names or not all(names):
            raise ConfigError(f"--segments file {spec!r}: expected one non-empty segment name per line, "
                              "one line per evaluation example")
        return names
    value = load_entry_point(spec, "segments")
    if callable(value):
        return value
    if isinstance(value, (list, tuple)):
        return [str(v) for v in value]
    raise ConfigError(f"segments entry point {spec!r} returned {type(value).__name__}: return a function of one "
                      "example's input tensor (its segment name) or a list of names, one per example")


def check_command(
    report_json: Annotated[Path, typer.Argument(help="The report.json to gate (written by prunekit report/prune).")],
    budget: Annotated[Path, typer.Option(help="YAML/JSON budget: max_accuracy_drop_points, max_segment_drop_points, "
                                              "max_latency_ms_p99 with batch_size, max_size_bytes, min_sparsity, "
                                              "fail_on_regression.")],
    previous: Annotated[Path | None, typer.Option(help="The previous report.json of the same model and data, "
                                                       "for a diff of what regressed.")] = None,
) -> None:
    """Gate a report against a budget: exit 1 with one line per broken budget, 0 when all pass.

    Exit code 2 means the gate could not check (unreadable files, an unknown budget key, or
    reports of different models or data).
    """
    try:
        result = check_report(load_report(report_json), load_budget(budget),
                              load_report(previous) if previous is not None else None)
    except PrunekitError as err:
        fail(err)
        return
    typer.echo(result.summary())
    if not result.passed:
        raise typer.Exit(code=1)


def sensitivity_command(
    recipe: Annotated[Path, typer.Option(help="YAML recipe (model, data, prune = the config family).")],
    out: Annotated[Path, typer.Option(help="Folder for sensitivity.json/.png and allocation.yaml.")] = Path(
        "out/sensitivity"
    ),
    levels: Annotated[str, typer.Option(help="Sparsities (or channel ratios) to probe, comma-separated.")] = (
        "0.5,0.7,0.8,0.9,0.95"
    ),
    metric: Annotated[str, typer.Option(help="'accuracy' on the eval loader, or 'loss' on a few batches.")] = (
        "accuracy"
    ),
    input_shape: Annotated[str, typer.Option(help="Example input shape for FLOPs/tracing, e.g. 1,1,28,28.")] = "",
    target_sparsity: Annotated[float, typer.Option(help="If > 0, allocate levels for this global sparsity.")] = 0.0,
    progress: Annotated[bool, typer.Option(help="Show a progress bar.")] = True,
    track: TrackOption = "",
) -> None:
    """Prune each layer alone at each level, measure it, and (optionally) allocate a budget.

    Under torchrun the cells are split among the ranks and merged into one table (see
    `prunekit.sensitivity`); rank 0 prints it.
    """
    try:
        if metric not in ("accuracy", "loss"):
            raise PrunekitError(f"--metric must be 'accuracy' or 'loss', got {metric!r}")
        loaded = load_recipe(recipe)
        if not isinstance(loaded, Recipe):
            raise PrunekitError(f"{recipe}: top-level _type must be Recipe, got {type(loaded).__name__}")
        shape = tuple(int(v) for v in floats(input_shape, "--input-shape")) or None
        target = SparsityTarget(sparsity=target_sparsity) if target_sparsity > 0 else None
        with tracking(track) as tracker, torchrun_process_group():
            result = run_sensitivity_recipe(loaded, out, levels=floats(levels, "--levels"), metric=metric,  # type: ignore[arg-type]
                                            input_shape=shape, target=target, progress=progress, tracker=tracker)
    except PrunekitError as err:
        fail(err)
        return
    if not main_process():
        return
    typer.echo(result["table"].summary())
    if result["allocation"] is not None:
        typer.echo(result["allocation"].summary())
    for name, path in result["files"].items():
        typer.echo(f"{name}: {path}")


def search_command(
    recipe: Annotated[Path, typer.Option(help="YAML SearchRecipe (model, data, prune family, search space).")],
    out: Annotated[Path, typer.Option(help="Folder for search.db (default storage) and best_recipe.yaml.")] = Path(
        "out/search"
    ),
    storage: Annotated[str, typer.Option(help="Optuna storage URL; a shared postgresql:// URL for workers.")] = "",
    trials: Annotated[int, typer.Option(help="Finished trials wanted in the study (overrides the recipe).")] = 0,
    track: TrackOption = "",
) -> None:
    """Search per-layer levels, schedule and distillation weight with Optuna, measuring each trial."""
    try:
        loaded = load_recipe(recipe)
        if not isinstance(loaded, SearchRecipe):
            raise PrunekitError(f"{recipe}: top-level _type must be SearchRecipe, got {type(loaded).__name__}")
        with tracking(track) as tracker:
            result = run_search_recipe(loaded, out, storage=storage or None, trials=trials or None, tracker=tracker)
    except PrunekitError as err:
        fail(err)
        return
    typer.echo(result.summary())
    if result.best:
        typer.echo(f"best rules: {out / 'best_recipe.yaml'}")


def bundle_command(
    model: Annotated[str, typer.Argument(help="Model entry point 'package.module:function' (the dense model).")],
    out: Annotated[Path, typer.Option(help="Folder (or .zip) to write the bundle to.")] = Path("out/bundle"),
    ratio: Annotated[float, typer.Option(help="ChannelConfig ratio whose groups are timed.")] = 0.3,
    levels: Annotated[str, typer.Option(help="Levels to time each group at, comma-separated.")] = "0.25,0.5",
    round_to: Annotated[int, typer.Option(help="ChannelConfig round_to.")] = 8,
    exclude: Annotated[list[str] | None, typer.Option(help="Layers to keep whole (repeatable).")] = None,
    input_shape: Annotated[str, typer.Option(help="Example input shape, e.g. 1,3,224,224 (default: the "
                                                  "model module's example_inputs()).")] = "",
    stored_inputs: Annotated[str, typer.Option("--inputs", help="'stored': save each variant's real input as .npy; "
                                               "'random': store only shapes, dtypes, statistics and a seed (the "
                                               "runner draws the same values each run; a much smaller bundle).")] = (
        "stored"),
) -> None:
    """Write a bench bundle: the ONNX variants a latency table needs, and a runner (numpy + onnxruntime only).

    Copy the folder to the target device and run `python bundle_runner.py BUNDLE --threads N` there;
    bring back device_table.json and turn it into a latency table with `prunekit device-table`.
    """
    try:
        net = load_entry_point(model, "model")
        inputs = resolve_inputs(model, input_shape, "")
        if not isinstance(net, nn.Module) or inputs is None:
            raise ConfigError(f"bundle: {model!r} must build an nn.Module, and the inputs need --input-shape or an "
                              "example_inputs() beside the model")
        config = ChannelConfig(ratio=ratio, round_to=round_to, exclude=tuple(exclude or ()))
        path = make_bundle(net, config, floats(levels, "--levels"), inputs, out, inputs=stored_inputs,  # type: ignore[arg-type]
                           progress=True)
    except PrunekitError as err:
        fail(err)
        return
    typer.echo(f"wrote {path}; on the device: python {path}/bundle_runner.py {path} --threads N")


def device_table_command(
    bundle: Annotated[Path, typer.Argument(help="The bundle written by `prunekit bundle`.")],
    results: Annotated[Path, typer.Argument(help="device_table.json written by the runner on the device.")],
    out: Annotated[Path, typer.Option(help="Where to write the LatencyTable (JSON).")] = Path("latency.json"),
) -> None:
    """Check a device's results against their bundle and write them as a LatencyTable for allocation."""
    try:
        table = load_device_table(bundle, results)
        table.save(out)
    except PrunekitError as err:
        fail(err)
        return
    typer.echo(f"wrote {out}: {len(table.units)} units at levels {table.levels}")
