"""The `prunekit` command line: thin wrappers over the Python API."""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated

import torch
import typer
from torch import nn

from prunekit.allocation.allocate import SparsityTarget
from prunekit.allocation.bundle import make_bundle
from prunekit.allocation.device_table import load_device_table
from prunekit.allocation.search import SearchRecipe
from prunekit.config import load_recipe
from prunekit.core.masks import sparsity
from prunekit.core.targets import prunable_layers
from prunekit.core.tracking import Tracker, log_report_headline, tracker_from_spec
from prunekit.deploy.checkpoint import load, read_checkpoint
from prunekit.deploy.onnx_export import ExportReport, export_onnx
from prunekit.deploy.quantize import DynamicInt8Config, quantize
from prunekit.errors import ConfigError, PrunekitError
from prunekit.measure.cost import CostQuery
from prunekit.measure.gate import check_report, load_budget, load_report
from prunekit.measure.report import compare, write_report
from prunekit.measure.segments import Segments
from prunekit.recipes.demo import DemoSettings, run_demo
from prunekit.recipes.entry import is_entry_point, load_entry_point
from prunekit.recipes.launch import launched_world, refuse_under_torchrun, torchrun_process_group
from prunekit.recipes.run import Recipe, run_recipe
from prunekit.recipes.search import run_search_recipe
from prunekit.recipes.sensitivity import run_sensitivity_recipe
from prunekit.storage.files import read_document
from prunekit.structured import ChannelConfig, analyze, trace
from prunekit.structured.layers import owner_of
from prunekit.structured.plan import excluded_layers
from prunekit.zoo import models as zoo

app = typer.Typer(help="Prune trained PyTorch models and measure what it bought.", no_args_is_help=True)


TrackOption = Annotated[str, typer.Option(
    help="Log to 'tensorboard:DIR' or 'mlflow:sqlite:///mlflow.db[#experiment]' (needs prunekit[tensorboard] / "
         "prunekit[mlflow]); under torchrun only rank 0 writes.")]


@contextmanager
def _tracking(spec: str) -> Iterator[Tracker | None]:
    """`--track SPEC` as a tracker (None without one), closed however the command ends; a bad
    spec fails before any work."""
    tracker = tracker_from_spec(spec) if spec else None
    try:
        yield tracker
    finally:
        if tracker is not None:
            tracker.close()


def _fail(err: PrunekitError) -> None:
    try:
        rank, world = launched_world()
    except ConfigError:
        rank, world = 0, 1
    # under torchrun every rank reports its own error, named unless the message names it already
    where = f"rank {rank} of {world}: " if world > 1 and not str(err).startswith(f"rank {rank} of") else ""
    typer.secho(f"{where}error: {err}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code=2)


def _main_process() -> bool:
    """True in one process, and on rank 0 under torchrun: the process that prints results."""
    return launched_world()[0] == 0


def _one_process(command: str, why: str) -> None:
    """Refuse `command` under torchrun (it is per-process) before any work, naming it."""
    try:
        refuse_under_torchrun(f"prunekit {command}", why)
    except PrunekitError as err:
        _fail(err)


@app.callback()
def main(verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log progress details.")] = False) -> None:
    """prunekit: smaller, faster models with measured results."""
    level = logging.INFO if verbose else logging.WARNING
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")


@app.command()
def demo(
    out: Annotated[Path, typer.Option(help="Folder for report.json, report.md, the plot and the model files.")] = Path(
        "out/demo"
    ),
    sparsity: Annotated[float, typer.Option(help="Target fraction of zero weights, in [0, 1).")] = 0.9,
    epochs: Annotated[int, typer.Option(help="Epochs of dense baseline training.")] = 8,
    finetune_epochs: Annotated[int, typer.Option(help="Epochs of gradual pruning with distillation.")] = 12,
    seed: Annotated[int, typer.Option(help="Random seed.")] = 0,
    quick: Annotated[bool, typer.Option(help="A small slice of MNIST and 1+2 epochs (a smoke test).")] = False,
    progress: Annotated[bool, typer.Option(help="Show progress bars.")] = True,
) -> None:
    """Compress LeNet-300-100 on real MNIST for a 1 MB budget and report the measured result."""
    _one_process("demo", "it trains, measures latency and writes its report in one process")
    if quick:
        epochs, finetune_epochs = min(epochs, 1), min(finetune_epochs, 2)
    try:
        settings = DemoSettings(sparsity=sparsity, epochs=epochs, finetune_epochs=finetune_epochs, seed=seed,
                                quick=quick)
        if not 0.0 <= sparsity < 1.0:
            raise PrunekitError(f"--sparsity must be in [0, 1), got {sparsity}")
        report = run_demo(out, settings, progress=progress)
    except PrunekitError as err:
        _fail(err)
        return
    b, p = report["baseline"], report["pruned"]
    typer.echo(f"dense : accuracy {b['accuracy']:.2%}  file {b['size_bytes']:>9,} B")
    typer.echo(
        f"pruned: accuracy {p['accuracy']:.2%}  file {p['size_bytes']:>9,} B  ({p['size_ratio']:.1%} of dense)  "
        f"sparsity {p['sparsity']:.2%}"
    )
    q = report["pruned_int8"]
    typer.echo(f"+ INT8: accuracy {q['accuracy']:.2%}  file {q['size_bytes']:>9,} B  "
               f"({q['compression_vs_dense']:.1f}x smaller than dense)")
    typer.echo(f"1 MB budget: {'fits' if report['budget']['fits'] else 'does NOT fit'}; report in {out}/report.html")


@app.command()
def inspect(
    target: Annotated[str, typer.Argument(help="A checkpoint written by prunekit.save, or a model entry point "
                                                "'module:function'.")],
    input_shape: Annotated[str, typer.Option(help="Shape of a random float example input, e.g. 1,3,224,224: "
                                                  "also trace the model and print its channel groups.")] = "",
    example_inputs: Annotated[str, typer.Option(help="Entry point 'module:function' returning example inputs "
                                                     "(tensor, tuple or dict); default: an 'example_inputs' "
                                                     "function beside the model entry point, if any.")] = "",
    exclude: Annotated[list[str] | None, typer.Option(help="Layer FQN or 're:regex' whose outputs must stay "
                                                           "(repeatable).")] = None,
) -> None:
    """Print a checkpoint's tensors, or a model's prunable layers and structured channel groups."""
    _one_process("inspect", "it reads one file or model and prints it")
    path = Path(target)
    try:
        if not path.exists() and ":" in target:
            _inspect_model(target, input_shape, example_inputs, exclude or [])
            return
        state, _ = read_checkpoint(path)
    except PrunekitError as err:
        _fail(err)
        return
    total = zeros = 0
    for key, tensor in state.items():
        z = int((tensor == 0).sum())
        total, zeros = total + tensor.numel(), zeros + z
        typer.echo(f"{key:<40} {str(tuple(tensor.shape)):<16} sparsity {z / max(tensor.numel(), 1):7.2%}")
    typer.echo(f"{'total':<40} {total:<16,} sparsity {zeros / max(total, 1):7.2%}  file {path.stat().st_size:,} B")



@app.command()
def export(
    checkpoint: Annotated[Path, typer.Argument(help="A checkpoint written by prunekit.save (fp32 or INT8).")],
    out: Annotated[Path, typer.Option(help="The .onnx file to write.")] = Path("model.onnx"),
    model: Annotated[str, typer.Option(
        help="Builds the architecture: an entry point package.module:function, or a prunekit.zoo name.")] = (
        "lenet_300_100"
    ),
    input_shape: Annotated[str, typer.Option(help="Example input shape, comma-separated.")] = "1,1,28,28",
    int8: Annotated[bool, typer.Option(help="Quantize to dynamic INT8 (zeros kept) before export.")] = False,
    check: Annotated[bool, typer.Option(help="Verify zeros, N:M groups and outputs in the file.")] = True,
    opset: Annotated[int, typer.Option(help="ONNX opset (18 or newer).")] = 20,
) -> None:
    """Export a checkpoint to ONNX, check the file kept its sparsity, and print its sizes."""
    _one_process("export", "it writes one file")
    try:
        shape = tuple(int(s) for s in input_shape.split(","))
    except ValueError:
        _fail(PrunekitError(f"--input-shape must be integers separated by commas, got {input_shape!r}"))
        return
    try:
        report = export_command(checkpoint, out, model=model, input_shape=shape, int8=int8, check=check,
                                opset=opset)
    except PrunekitError as err:
        _fail(err)
        return
    typer.echo(report.summary())


def export_command(
    checkpoint: str | Path,
    out: str | Path,
    *,
    model: str = "lenet_300_100",
    input_shape: tuple[int, ...] = (1, 1, 28, 28),
    int8: bool = False,
    check: bool = True,
    opset: int | None = None,
) -> ExportReport:
    """Load a `prunekit.save` checkpoint into a `prunekit.zoo` model and export it to ONNX (the body
    of `prunekit export`, testable without Typer; writes `out`, mutates nothing else).

    Args:
        checkpoint: a file written by `prunekit.save` (fp32 or INT8: an INT8 file, recognised
            by its per-channel '*.weight_scale' tensors, is loaded into a dynamic-INT8 model).
        out: the .onnx file to write (atomically, after the check).
        model: an entry point "package.module:function" that builds the architecture (dense; a
            structured checkpoint's plan is replayed on it), or a `prunekit.zoo` constructor name.
        input_shape: shape of the random example input used to trace and check.
        int8: quantize an fp32 checkpoint to dynamic INT8 (`DynamicInt8Config`) first.
        check: verify the file (see `export_onnx`).
        opset: ONNX opset (default 20).

    Raises:
        ConfigError: unknown zoo model.
        CheckpointError: the checkpoint does not fit the model.
    """
    net = _model_to_export(model)
    state, _ = read_checkpoint(checkpoint)
    stored_int8 = any(k.endswith(".weight_scale") for k in state)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao's deprecation notice
        if stored_int8:
            net = load(checkpoint, quantize(net, DynamicInt8Config()))
        else:
            net = load(checkpoint, net)
            if int8:
                net = quantize(net, DynamicInt8Config())
    example = torch.randn(*input_shape)
    return export_onnx(net, out, example, check=check, opset=opset)


def _model_to_export(model: str) -> nn.Module:
    """`export --model`: an entry point "package.module:function", or a `prunekit.zoo` name."""
    if ":" in model:
        net = load_entry_point(model, "model")
        if not isinstance(net, nn.Module):
            raise ConfigError(f"export --model: entry point {model!r} returned {type(net).__name__}, not an nn.Module")
        return net
    build = getattr(zoo, model, None)
    if not callable(build) or model.startswith("_"):
        known = ", ".join(n for n in dir(zoo) if not n.startswith("_") and callable(getattr(zoo, n))
                          and n[0].islower())
        raise ConfigError(f"export --model: unknown zoo model {model!r} (known: {known}), and not an entry "
                          "point 'package.module:function'")
    return build()


def _inspect_model(entry_point: str, input_shape: str = "", example_inputs: str = "",
                   exclude: list[str] | None = None) -> None:
    model = load_entry_point(entry_point, "model")
    inputs = _example_inputs(entry_point, input_shape, example_inputs)
    measured = sparsity(model)
    typer.echo(f"{'prunable layer':<40} {'type':<10} {'weight shape':<20} {'params':>10}  sparsity")
    for fqn, module in prunable_layers(model).items():
        weight: torch.Tensor = module.weight  # type: ignore[assignment]
        typer.echo(f"{fqn:<40} {type(module).__name__:<10} {str(tuple(weight.shape)):<20} {weight.numel():>10,}  "
                   f"{measured.layers.get(fqn, 0.0):7.2%}")
    typer.echo(f"{len(measured.layers)} prunable layers, {measured.total_numel:,} prunable weights")
    if inputs is None:
        typer.echo("(give --input-shape or --example-inputs to also see the structured channel groups)")
        return
    _echo_groups(model, inputs, exclude or [])


def _example_inputs(entry_point: str, input_shape: str, example_inputs: str) -> object:
    """The inputs to trace with: --input-shape, --example-inputs, or `example_inputs` beside the model."""
    import importlib

    import torch

    if input_shape:
        shape = [int(v) for v in _floats(input_shape, "--input-shape")]
        if not shape or min(shape) < 1 or any(float(v) != int(float(v)) for v in input_shape.split(",")):
            raise PrunekitError(f"--input-shape must be positive integers separated by commas, got {input_shape!r}")
        return torch.randn(*shape)
    if example_inputs:
        return load_entry_point(example_inputs, "example inputs")
    module = importlib.import_module(entry_point.partition(":")[0])
    if callable(getattr(module, "example_inputs", None)):
        return load_entry_point(f"{module.__name__}:example_inputs", "example inputs")
    return None


def _echo_groups(model: object, inputs: object, exclude: list[str]) -> None:
    """Trace, then print each coupled channel group and each layer whose outputs cannot shrink."""
    model.eval()  # type: ignore[attr-defined]
    graph = analyze(model, trace(model, inputs), excluded_layers(model, tuple(exclude)))  # type: ignore[arg-type]
    typer.echo(f"\nprunable channel groups: {len(graph.groups)} (units removed together; a ratio applies per group)")
    for i, g in enumerate(graph.groups):
        width = min(len(g.positions[m][0]) for m in g.members)
        unit = "heads" if g.kind == "head" else "channels" if width == 1 else f"units of {width}"
        coupled = sorted({owner_of(fqn)[0] for fqn, _ in g.members})
        typer.echo(f"  [{i}] {g.size} {unit}: outputs of {', '.join(g.layers) or '-'}")
        typer.echo(f"      coupled layers ({len(coupled)}): {', '.join(coupled)}")
    if graph.blocked:
        typer.echo(f"\nlayers whose output channels cannot be removed: {len(graph.blocked)}")
        for layer, why in graph.blocked.items():
            typer.echo(f"  {layer}: {'; '.join(why)}")
    for op, layer in graph.barriers:
        typer.echo(f"  barrier: unknown op {op} in {layer or '<root>'!r} (nothing is pruned across it)")


@app.command("prune")
def prune_command(
    recipe: Annotated[Path, typer.Option(help="YAML/JSON recipe (see prunekit.recipes.run for the format).")],
    out: Annotated[Path, typer.Option(help="Folder for pruned.safetensors and the report.")] = Path("out/prune"),
    progress: Annotated[bool, typer.Option(help="Show progress bars.")] = True,
    checkpoint_dir: Annotated[Path | None, typer.Option(help="Folder for resumable fine-tuning checkpoints.")] = None,
    checkpoint_every: Annotated[int, typer.Option(help="Optimizer steps between checkpoints.")] = 100,
    resume: Annotated[bool, typer.Option(help="Continue an interrupted run from --checkpoint-dir.")] = False,
    track: TrackOption = "",
) -> None:
    """Run a pruning recipe on your own model: build, prune, fine-tune, save, report.

    With --checkpoint-dir the fine-tuning state is saved as it goes; after a crash or a kill,
    the same command with --resume continues from the last checkpoint.

    Under `torchrun --nproc_per_node N -m prunekit prune ...` every rank prunes (gloo on CPU,
    NCCL on GPUs; each collective times out after $PRUNEKIT_COLLECTIVE_TIMEOUT_S seconds, default
    1800) and rank 0 alone writes --out and prints.
    """
    try:
        loaded = load_recipe(recipe)
        if not isinstance(loaded, Recipe):
            raise PrunekitError(f"{recipe}: top-level _type must be Recipe, got {type(loaded).__name__}")
        with _tracking(track) as tracker, torchrun_process_group():
            result = run_recipe(loaded, out, progress=progress, checkpoint_dir=checkpoint_dir,
                                checkpoint_every=checkpoint_every, resume=resume, tracker=tracker)
    except PrunekitError as err:
        _fail(err)
        return
    if not _main_process():
        return
    for line in result.get("verdicts", []):
        typer.echo(line)
    typer.echo(f"pruned model: {out / 'pruned.safetensors'} ({result['pruned']['size_bytes']:,} B)")


@app.command()
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
    _one_process("report", "it measures latency, which other processes on the machine would disturb")
    try:
        from functools import partial

        import torch

        sizes = [int(v) for v in _floats(batch_sizes, "--batch-sizes")]
        if not sizes or min(sizes) < 1 or repeats < 1 or warmup < 0 or threads < 0:
            raise PrunekitError(f"--batch-sizes must be positive integers, --repeats >= 1, --warmup and "
                                f"--threads >= 0; got {batch_sizes!r}, {repeats}, {warmup}, {threads}")
        cost = _cost_query(qps, serving_batch, price_per_host_hour)
        with _tracking(track) as tracker:  # a bad spec fails here, before anything is measured
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
        _fail(err)
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


@app.command("check")
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
        _fail(err)
        return
    typer.echo(result.summary())
    if not result.passed:
        raise typer.Exit(code=1)


def _floats(text: str, option: str) -> list[float]:
    try:
        return [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise PrunekitError(f"{option} must be numbers separated by commas, got {text!r}") from None


@app.command("sensitivity")
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
        shape = tuple(int(v) for v in _floats(input_shape, "--input-shape")) or None
        target = SparsityTarget(sparsity=target_sparsity) if target_sparsity > 0 else None
        with _tracking(track) as tracker, torchrun_process_group():
            result = run_sensitivity_recipe(loaded, out, levels=_floats(levels, "--levels"), metric=metric,  # type: ignore[arg-type]
                                            input_shape=shape, target=target, progress=progress, tracker=tracker)
    except PrunekitError as err:
        _fail(err)
        return
    if not _main_process():
        return
    typer.echo(result["table"].summary())
    if result["allocation"] is not None:
        typer.echo(result["allocation"].summary())
    for name, path in result["files"].items():
        typer.echo(f"{name}: {path}")


@app.command("search")
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
        with _tracking(track) as tracker:
            result = run_search_recipe(loaded, out, storage=storage or None, trials=trials or None, tracker=tracker)
    except PrunekitError as err:
        _fail(err)
        return
    typer.echo(result.summary())
    if result.best:
        typer.echo(f"best rules: {out / 'best_recipe.yaml'}")



@app.command("bundle")
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
        inputs = _example_inputs(model, input_shape, "")
        if not isinstance(net, nn.Module) or inputs is None:
            raise ConfigError(f"bundle: {model!r} must build an nn.Module, and the inputs need --input-shape or an "
                              "example_inputs() beside the model")
        config = ChannelConfig(ratio=ratio, round_to=round_to, exclude=tuple(exclude or ()))
        path = make_bundle(net, config, _floats(levels, "--levels"), inputs, out, inputs=stored_inputs,  # type: ignore[arg-type]
                           progress=True)
    except PrunekitError as err:
        _fail(err)
        return
    typer.echo(f"wrote {path}; on the device: python {path}/bundle_runner.py {path} --threads N")


@app.command("device-table")
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
        _fail(err)
        return
    typer.echo(f"wrote {out}: {len(table.units)} units at levels {table.levels}")


if __name__ == "__main__":  # pragma: no cover
    app()
