"""`prunekit demo`, `inspect`, `export` and `prune`: the commands that make (and look into) a smaller model."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Annotated

import torch
import typer
from torch import nn

from prunekit.cli.support import TrackOption, fail, main_process, one_process, resolve_inputs, tracking
from prunekit.config import load_recipe
from prunekit.core.masks import sparsity
from prunekit.core.targets import prunable_layers
from prunekit.deploy.checkpoint import load, read_checkpoint
from prunekit.deploy.onnx_export import ExportReport, export_onnx
from prunekit.deploy.quantize import DynamicInt8Config, quantize
from prunekit.errors import ConfigError, PrunekitError
from prunekit.recipes.demo import DemoSettings, run_demo
from prunekit.recipes.entry import load_entry_point
from prunekit.recipes.launch import torchrun_process_group
from prunekit.recipes.run import Recipe, run_recipe
from prunekit.structured import analyze, trace
from prunekit.structured.layers import owner_of
from prunekit.structured.plan import excluded_layers
from prunekit.zoo import models as zoo


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
    one_process("demo", "it trains, measures latency and writes its report in one process")
    if quick:
        epochs, finetune_epochs = min(epochs, 1), min(finetune_epochs, 2)
    try:
        settings = DemoSettings(sparsity=sparsity, epochs=epochs, finetune_epochs=finetune_epochs, seed=seed,
                                quick=quick)
        if not 0.0 <= sparsity < 1.0:
            raise PrunekitError(f"--sparsity must be in [0, 1), got {sparsity}")
        report = run_demo(out, settings, progress=progress)
    except PrunekitError as err:
        fail(err)
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
    one_process("inspect", "it reads one file or model and prints it")
    path = Path(target)
    try:
        if not path.exists() and ":" in target:
            _inspect_model(target, input_shape, example_inputs, exclude or [])
            return
        state, _ = read_checkpoint(path)
    except PrunekitError as err:
        fail(err)
        return
    total = zeros = 0
    for key, tensor in state.items():
        z = int((tensor == 0).sum())
        total, zeros = total + tensor.numel(), zeros + z
        typer.echo(f"{key:<40} {str(tuple(tensor.shape)):<16} sparsity {z / max(tensor.numel(), 1):7.2%}")
    typer.echo(f"{'total':<40} {total:<16,} sparsity {zeros / max(total, 1):7.2%}  file {path.stat().st_size:,} B")


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
    one_process("export", "it writes one file")
    try:
        shape = tuple(int(s) for s in input_shape.split(","))
    except ValueError:
        fail(PrunekitError(f"--input-shape must be integers separated by commas, got {input_shape!r}"))
        return
    try:
        report = export_command(checkpoint, out, model=model, input_shape=shape, int8=int8, check=check,
                                opset=opset)
    except PrunekitError as err:
        fail(err)
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
    inputs = resolve_inputs(entry_point, input_shape, example_inputs)
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
        with tracking(track) as tracker, torchrun_process_group():
            result = run_recipe(loaded, out, progress=progress, checkpoint_dir=checkpoint_dir,
                                checkpoint_every=checkpoint_every, resume=resume, tracker=tracker)
    except PrunekitError as err:
        fail(err)
        return
    if not main_process():
        return
    for line in result.get("verdicts", []):
        typer.echo(line)
    typer.echo(f"pruned model: {out / 'pruned.safetensors'} ({result['pruned']['size_bytes']:,} B)")
