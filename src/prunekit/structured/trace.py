"""Trace a model into an ATen graph whose nodes know their parameters and their layer FQN.

Why `torch.export` (non-strict) rather than `torch.fx.symbolic_trace`: symbolic tracing runs
the Python forward with proxies, so every `if x.shape[1] > ...`, mask-building helper and
cache object in Hugging Face models (BERT, Llama, GPT-2, ViT in transformers 5) breaks it,
and `transformers.utils.fx` no longer exists. `torch.export` runs the forward on fake tensors
with real shapes, so shape-dependent Python works, while data-dependent control flow still
fails loudly (which we turn into a `TraceError` naming the module). Its graph lifts every
parameter and buffer to a placeholder named by its FQN, and every node carries the
`nn_module_stack` of the layer that produced it, which is what errors and warnings need.
"""

from __future__ import annotations

import inspect
import logging
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from prunekit.core.inputs import split_inputs
from prunekit.errors import TraceError

log = logging.getLogger(__name__)
_PREFIX = "model."


class _TensorOutputs(nn.Module):
    """Wrap a model so its outputs are a flat tuple of tensors (HF outputs hold caches)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, *args: Any, **kwargs: Any) -> tuple[Tensor, ...]:
        return tuple(_tensors(self.model(*args, **kwargs)))


def _tensors(value: Any) -> list[Tensor]:
    if isinstance(value, Tensor):
        return [value]
    if isinstance(value, Mapping):
        return [t for v in value.values() for t in _tensors(v)]
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in _tensors(v)]
    return []


@dataclass
class TracedModel:
    """An exported graph plus the maps the dependency analysis needs.

    Attributes:
        graph: the ATen-level `torch.fx.Graph`.
        tensor_of: placeholder name -> parameter/buffer FQN in the user's model.
        user_inputs: placeholder names of the model's own inputs.
    """

    graph: torch.fx.Graph
    tensor_of: dict[str, str] = field(default_factory=dict)
    user_inputs: list[str] = field(default_factory=list)

    @staticmethod
    def layer_of(node: torch.fx.Node) -> str:
        """FQN of the innermost module that produced `node` ("" for the root)."""
        stack = node.meta.get("nn_module_stack") or {}
        if not stack:
            return ""
        path = list(stack.values())[-1][0]
        path = path.removeprefix("model").removeprefix(".") if path.startswith("model") else path
        return path


def _hf_kwargs(model: nn.Module, kwargs: dict[str, Any]) -> dict[str, Any]:
    # A KV cache concatenates fixed-size tensors onto keys/values, which would pin the head
    # count; a traced forward for pruning never needs it.
    if getattr(getattr(model, "config", None), "use_cache", None) is None or "use_cache" in kwargs:
        return kwargs
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return kwargs
    if "use_cache" in params:
        return {**kwargs, "use_cache": False}
    return kwargs


def trace(model: nn.Module, example_inputs: Any) -> TracedModel:
    """Export `model` on `example_inputs` to an ATen graph; does not mutate the model.

    Args:
        model: the model to analyse; traced in its current train/eval mode.
        example_inputs: a tensor, a tuple of positional inputs or a dict of keyword inputs.

    Returns:
        A `TracedModel`.

    Raises:
        TraceError: the model has data-dependent control flow or an op export rejects; the
            message names the innermost module whose forward failed.

    Example:
        >>> traced = trace(nn.Sequential(nn.Linear(4, 2)), torch.randn(1, 4))
    """
    if example_inputs is None:
        raise TraceError("structured pruning traces the model: pass example_inputs=...")
    args, kwargs = split_inputs(example_inputs)
    kwargs = _hf_kwargs(model, kwargs)
    wrapper = _TensorOutputs(model)
    try:
        with torch.no_grad(), warnings.catch_warnings():
            # nn.LSTM/GRU re-assign `_flat_weights` in forward; export warns about it, harmlessly.
            warnings.filterwarnings("ignore", message=r"The tensor attributes .*_flat_weights")
            program = torch.export.export(wrapper, args, kwargs, strict=False)
    except Exception as err:  # export raises many types; all mean "cannot trace"
        where = _failing_module(model, err)
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise TraceError(
            f"cannot trace {type(model).__name__} for structured pruning: module {where!r} "
            f"failed ({type(err).__name__}: {first[:300]}). Data-dependent control flow "
            "(Python `if` on tensor values) cannot be traced; rewrite it with torch.where or "
            "exclude that part of the model."
        ) from err
    sig = program.graph_signature
    tensor_of = {}
    for mapping in (sig.inputs_to_parameters, sig.inputs_to_buffers, sig.inputs_to_lifted_tensor_constants):
        for name, fqn in mapping.items():
            tensor_of[name] = fqn.removeprefix(_PREFIX)
    return TracedModel(program.graph, tensor_of, list(sig.user_inputs))


def _failing_module(model: nn.Module, err: BaseException) -> str:
    """FQN of the innermost module of `model` whose forward is on the error's traceback."""
    names = {id(m): fqn for fqn, m in model.named_modules()}
    found = type(model).__name__
    tb = err.__traceback__
    while tb is not None:
        owner = tb.tb_frame.f_locals.get("self")
        if owner is not None and id(owner) in names:
            found = names[id(owner)] or "<root>"
        tb = tb.tb_next
    return found
