"""Running a model block by block: the plumbing of the sequential calibration recipe.

An LLM's decoder layers are an `nn.ModuleList` of repeated blocks. `find_blocks` finds them,
`capture_inputs` records what block 0 receives on each calibration batch (stopping the forward
there), and `with_hidden(args, kwargs, hidden_of(block(...)))` turns a block's outputs into the
next block's inputs, so a pass holds about one block of activations. `blocks_chain` checks that
assumption (block 1's input is block 0's output) before a runner relies on it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from prunekit.core.inputs import call_model, to_model_device
from prunekit.errors import CalibrationError
from prunekit.methods.batches import Batch


class _Stop(Exception):
    """Raised by a pre-hook to stop a forward pass once the wanted inputs are captured."""


def find_blocks(model: nn.Module, fqns: list[str]) -> list[tuple[str, nn.Module]] | None:
    """The repeated blocks (an `nn.ModuleList`) holding the most target layers, or None.

    None when no ModuleList has at least two children containing target layers.
    """
    best, best_count = None, 0
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) < 2:
            continue
        children = [(f"{name}.{c}" if name else c, m) for c, m in module.named_children()]
        counts = [sum(f.startswith(c + ".") for f in fqns) for c, _ in children]
        if sum(1 for k in counts if k) >= 2 and sum(counts) > best_count:
            best, best_count = children, sum(counts)
    return best


def without_cache(kwargs: dict[str, Any]) -> dict[str, Any]:
    """A block's keyword arguments with its KV cache off (it would grow with every re-run, attending to stale keys)."""
    out = dict(kwargs)
    if "past_key_values" in out:
        out["past_key_values"] = None
    if "use_cache" in out:
        out["use_cache"] = False
    return out


def inputs_to(model: nn.Module, block: nn.Module, batch: Batch) -> tuple[tuple, dict] | None:
    """Run `model` on `batch` only as far as `block`: the (args, kwargs) it would receive."""
    seen: list[tuple[tuple, dict]] = []

    def hook(_m: nn.Module, args: tuple, kwargs: dict) -> None:
        seen.append((args, kwargs))
        raise _Stop

    handle = block.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        call_model(model, to_model_device(model, batch))
    except _Stop:
        pass
    finally:
        handle.remove()
    return seen[0] if seen else None


def capture_inputs(model: nn.Module, block: nn.Module, batches: list[Batch]) -> list[tuple[tuple, dict]]:
    """What `block` receives on each batch (its KV cache off); a `CalibrationError` if a batch never reaches it."""
    captured = []
    for batch in batches:
        inputs = inputs_to(model, block, batch)
        if inputs is not None:
            captured.append((inputs[0], without_cache(inputs[1])))
    if len(captured) != len(batches):
        raise CalibrationError(f"only {len(captured)} of {len(batches)} calibration batches reached the blocks")
    return captured


def feed(fn: Callable[[Any], Any], items: list[Any]) -> None:
    """Call `fn` on each item, dropping the outputs at once (memory stays one batch)."""
    for item in items:
        fn(item)


def call_block(block: nn.Module, args_kwargs: tuple[tuple, dict]) -> Any:
    """`block` called on captured (args, kwargs)."""
    return block(*args_kwargs[0], **args_kwargs[1])


def hidden_of(out: Any) -> Tensor:
    """A block's hidden state: its output, or the first element of a tuple of outputs."""
    return out[0] if isinstance(out, (tuple, list)) else out


def with_hidden(args: tuple, kwargs: dict, hidden: Tensor) -> tuple[tuple, dict]:
    """The next block's (args, kwargs): these, the hidden state (first positional, or `hidden_states`) replaced."""
    if args:
        return (hidden, *args[1:]), kwargs
    return args, {**kwargs, "hidden_states": hidden}


def blocks_chain(model: nn.Module, blocks: list[tuple[str, nn.Module]], batch: Batch, first: tuple) -> bool:
    """Check the assumption the runner rests on: block 1's input is block 0's output."""
    inputs = inputs_to(model, blocks[1][1], batch)
    if inputs is None:
        return False
    args, kwargs = inputs
    actual = args[0] if args else kwargs.get("hidden_states")
    expected = hidden_of(blocks[0][1](*first[0], **first[1]))
    return isinstance(actual, Tensor) and actual.shape == expected.shape and torch.allclose(actual, expected, atol=1e-5)
