"""Model inputs in the three shapes users pass them: a tensor, a tuple of args, or a dict of kwargs.

Every pass prunekit runs (calibration, tracing, FLOP counting, latency timing, scoring) calls
the model through these, so a batch shape works everywhere or nowhere.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor, nn


def split_inputs(inputs: Any) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """Normalise `inputs` (a tensor, a tuple/list of args, or a dict of kwargs) to (args, kwargs)."""
    if isinstance(inputs, Mapping):
        return (), dict(inputs)
    if isinstance(inputs, (list, tuple)):
        return tuple(inputs), {}
    return (inputs,), {}


def call_model(model: nn.Module, inputs: Any) -> Any:
    """`model(x)`, `model(*args)` or `model(**kwargs)`, as `inputs` is shaped."""
    if isinstance(inputs, Mapping):
        return model(**inputs)
    if isinstance(inputs, (tuple, list)):
        return model(*inputs)
    return model(inputs)


def to_model_device(model: nn.Module, inputs: Any) -> Any:
    """`inputs` with every tensor moved to the device of `model`'s parameters (unchanged if none)."""
    device = next((p.device for p in model.parameters()), None)

    def move(v: Any) -> Any:
        return v.to(device) if isinstance(v, Tensor) and device is not None else v

    if isinstance(inputs, Mapping):
        return {k: move(v) for k, v in inputs.items()}
    if isinstance(inputs, (tuple, list)):
        return [move(v) for v in inputs]
    return move(inputs)


@torch.no_grad()
def run_with_hooks(
    model: nn.Module, inputs: Any, hooks: Mapping[str, Callable[..., Any]], *, pre: bool = False
) -> None:
    """One eval-mode forward on `inputs` with a hook on each named module (a forward-pre hook
    if `pre`); the hooks are removed and the train/eval mode restored afterwards."""
    modules = dict(model.named_modules())
    register = "register_forward_pre_hook" if pre else "register_forward_hook"
    handles = [getattr(modules[fqn], register)(hook) for fqn, hook in hooks.items()]
    training = model.training
    try:
        model.eval()
        call_model(model, inputs)
    finally:
        model.train(training)
        for handle in handles:
            handle.remove()
