"""A recipe's inputs: entry points called, a Hugging Face folder loaded, batches cut to what a stage needs.

The one place the `prune`, `sensitivity` and `search` commands turn a recipe's strings into
objects, so they fail alike, with the recipe field in the message.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from prunekit.core.distributed import rank_and_world
from prunekit.deploy.checkpoint import load
from prunekit.errors import ConfigError


def is_entry_point(value: str) -> bool:
    """Whether `value` has the form 'package.module:function'."""
    return value.count(":") == 1 and all(value.split(":"))


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


def load_model(spec: str, checkpoint: str | None = None) -> nn.Module:
    """The recipe's model: an entry point's return value, or a Hugging Face causal LM folder
    (safetensors only), with `checkpoint` loaded into it.

    Raises:
        ConfigError: the entry point fails or returns something other than an `nn.Module`, or
            the folder is not a Hugging Face model folder.
    """
    if is_entry_point(spec):
        model = load_entry_point(spec, "model")
        if not isinstance(model, nn.Module):
            raise ConfigError(f"model entry point {spec!r} returned {type(model).__name__}, not an nn.Module")
    else:
        model = _hf_folder(Path(spec))
    if checkpoint:
        load(checkpoint, model)
    return model


def _hf_folder(folder: Path) -> nn.Module:
    if not (folder / "config.json").is_file():
        raise ConfigError(f"recipe.model {str(folder)!r} is neither an entry point 'package.module:function' "
                          "nor a Hugging Face model folder (no config.json there)")
    try:
        from transformers import AutoModelForCausalLM
    except ImportError as err:
        raise ConfigError(f"recipe.model {str(folder)!r} is a Hugging Face folder: pip install transformers "
                          f"({err})") from None
    try:  # safetensors only: a pytorch_model.bin would be a pickle
        return AutoModelForCausalLM.from_pretrained(folder, use_safetensors=True, dtype=torch.float32).eval()
    except (OSError, ValueError) as err:
        raise ConfigError(f"recipe.model {str(folder)!r}: cannot load it as a causal LM: {err}") from None


def load_data(spec: str) -> tuple[Any, Any]:
    """(train, eval) from the recipe's data entry point.

    Raises:
        ConfigError: the entry point fails or does not return a pair.
    """
    loaders = load_entry_point(spec, "data")
    if not (isinstance(loaders, (tuple, list)) and len(loaders) == 2):
        raise ConfigError(f"data entry point {spec!r} must return (train_loader, eval_loader), "
                          f"got {type(loaders).__name__}")
    return loaders[0], loaders[1]


def model_inputs(batch: Any) -> Any:
    """A batch without its targets: `(inputs, targets)` -> inputs, a mapping without "labels"."""
    if isinstance(batch, (tuple, list)):
        return batch[0]
    if isinstance(batch, dict):
        return {k: v for k, v in batch.items() if k != "labels"}
    return batch


def first_sample(inputs: Any) -> Any:
    """`inputs` cut to batch 1 (tensors, and tensors inside mappings and sequences)."""
    if isinstance(inputs, Tensor):
        return inputs[:1]
    if isinstance(inputs, dict):
        return {k: first_sample(v) for k, v in inputs.items()}
    if isinstance(inputs, (tuple, list)):
        return type(inputs)(first_sample(v) for v in inputs)
    return inputs


def first_batch(*loaders: Any) -> Any:
    """The inputs of the first batch of the first of `loaders` that has one (None if none has)."""
    for loader in loaders:
        if loader is None or isinstance(loader, (Tensor, dict)):  # token streams are not loaders
            continue
        batch = next(iter(loader), None)
        if batch is not None:
            return model_inputs(batch)
    return None


def calibration_batches(source: str | int, train: Iterable[Any] | None, field: str = "recipe.calibration") -> list:
    """This process's calibration batches: an entry point's list, or the first N batches of `train`
    without their targets; batch i goes to rank i % world (all of them in one process).

    Raises:
        ConfigError: the entry point fails or returns no list, N batches are asked of a recipe
            without training data, or there are fewer batches than ranks.
    """
    if isinstance(source, int):
        if train is None:
            raise ConfigError(f"{field} = {source} takes the first {source} training batches: set recipe.data")
        batches = [model_inputs(b) for _, b in zip(range(source), train, strict=False)]
        where = f"{field} = {source} (training batches)"
    else:
        loaded = load_entry_point(source, "calibration")
        try:
            batches = [loaded] if isinstance(loaded, Tensor) else list(loaded)
        except TypeError:
            raise ConfigError(f"calibration entry point {source!r} must return batches (a list), "
                              f"got {type(loaded).__name__}") from None
        where = f"calibration entry point {source!r}"
    rank, world = rank_and_world()
    if len(batches) < world:
        raise ConfigError(f"{where} gave {len(batches)} batches for {world} ranks: under torchrun each rank "
                          "calibrates on its own share, so give at least one per rank")
    return batches[rank::world]


def shapes(inputs: Any) -> str:
    """The shapes of the tensors in `inputs`, for an error message."""
    if isinstance(inputs, Tensor):
        return f"shape {list(inputs.shape)}"
    if isinstance(inputs, dict):
        return ", ".join(f"{k}: {shapes(v)}" for k, v in inputs.items())
    if isinstance(inputs, (tuple, list)):
        return ", ".join(shapes(v) for v in inputs)
    return type(inputs).__name__
