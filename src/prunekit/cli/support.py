"""What the `prunekit` commands share: the --track option, error exits, the rank checks, and
parsing of number lists and example inputs."""

from __future__ import annotations

import importlib
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Annotated

import torch
import typer

from prunekit.core.tracking import Tracker, tracker_from_spec
from prunekit.errors import ConfigError, PrunekitError
from prunekit.recipes.entry import load_entry_point
from prunekit.recipes.launch import launched_world, refuse_under_torchrun

TrackOption = Annotated[str, typer.Option(
    help="Log to 'tensorboard:DIR' or 'mlflow:sqlite:///mlflow.db[#experiment]' (needs prunekit[tensorboard] / "
         "prunekit[mlflow]); under torchrun only rank 0 writes.")]


@contextmanager
def tracking(spec: str) -> Iterator[Tracker | None]:
    """`--track SPEC` as a tracker (None without one), closed however the command ends; a bad
    spec fails before any work."""
    tracker = tracker_from_spec(spec) if spec else None
    try:
        yield tracker
    finally:
        if tracker is not None:
            tracker.close()


def fail(err: PrunekitError) -> None:
    """Print `err` in red on stderr (naming the rank under torchrun) and exit with code 2."""
    try:
        rank, world = launched_world()
    except ConfigError:
        rank, world = 0, 1
    # under torchrun every rank reports its own error, named unless the message names it already
    where = f"rank {rank} of {world}: " if world > 1 and not str(err).startswith(f"rank {rank} of") else ""
    typer.secho(f"{where}error: {err}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code=2)


def main_process() -> bool:
    """True in one process, and on rank 0 under torchrun: the process that prints results."""
    return launched_world()[0] == 0


def one_process(command: str, why: str) -> None:
    """Refuse `command` under torchrun (it is per-process) before any work, naming it."""
    try:
        refuse_under_torchrun(f"prunekit {command}", why)
    except PrunekitError as err:
        fail(err)


def floats(text: str, option: str) -> list[float]:
    """Comma-separated numbers of command-line `option`; a `PrunekitError` naming it otherwise."""
    try:
        return [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise PrunekitError(f"{option} must be numbers separated by commas, got {text!r}") from None


def resolve_inputs(entry_point: str, input_shape: str, example_inputs: str) -> object:
    """The inputs to trace with: --input-shape, --example-inputs, or `example_inputs` beside the model."""
    if input_shape:
        shape = [int(v) for v in floats(input_shape, "--input-shape")]
        if not shape or min(shape) < 1 or any(float(v) != int(float(v)) for v in input_shape.split(",")):
            raise PrunekitError(f"--input-shape must be positive integers separated by commas, got {input_shape!r}")
        return torch.randn(*shape)
    if example_inputs:
        return load_entry_point(example_inputs, "example inputs")
    module = importlib.import_module(entry_point.partition(":")[0])
    if callable(getattr(module, "example_inputs", None)):
        return load_entry_point(f"{module.__name__}:example_inputs", "example inputs")
    return None
