"""INT8 layers as plain tensors: recognise PyTorch's quantized Linears and (de)serialise them.

A leaf of `prunekit.deploy` (it imports only torch and `prunekit.errors`), so the checkpoint
writer, the ONNX exporter and its check can all read INT8 models without importing the
quantizer that makes them. A quantized layer 'fc' is stored as 'fc.weight' (int8, so the
sparse encoding stores one byte per non-zero), 'fc.weight_scale' (float32, one per output
channel, zero point 0) and 'fc.bias', never as PyTorch's packed params (which only pickle).
"""

from __future__ import annotations

import collections

import torch
from torch import Tensor, nn

from prunekit.errors import PrunekitError


def is_quantized_linear(module: nn.Module) -> bool:
    """True for PyTorch's quantized Linear modules (their `weight()` is a method)."""
    return type(module).__module__.startswith("torch.ao.nn.quantized") and callable(
        getattr(module, "weight", None)) and hasattr(module, "in_features")


def int8_sparsity(model: nn.Module) -> dict[str, float]:
    """Fraction of int8 zeros in each quantized Linear's weight, by FQN (reads only)."""
    return {fqn: float((m.weight().int_repr() == 0).float().mean())
            for fqn, m in model.named_modules() if is_quantized_linear(m)}


def int8_state(model: nn.Module, state: dict[str, Tensor]) -> dict[str, Tensor]:
    """`state` with each quantized Linear's packed params replaced by plain tensors (a new dict).

    Raises:
        PrunekitError: a layer has a non-zero zero point (only symmetric INT8 keeps zeros zero).
    """
    layers = {fqn: m for fqn, m in model.named_modules() if is_quantized_linear(m)}
    if not layers:
        return state
    prefixes = tuple(f"{fqn}." if fqn else "" for fqn in layers)
    out = {k: v for k, v in state.items() if not k.startswith(prefixes)}
    for fqn, module in layers.items():
        q = module.weight()
        if q.qscheme() in (torch.per_channel_affine, torch.per_channel_symmetric):
            scale, zero = q.q_per_channel_scales().float(), q.q_per_channel_zero_points()
        else:
            scale = torch.full((q.shape[0],), q.q_scale(), dtype=torch.float32)
            zero = torch.tensor([q.q_zero_point()])
        if bool((zero != 0).any()):
            raise PrunekitError(f"layer {fqn!r}: only symmetric INT8 (zero point 0) can be saved; "
                                "quantize with prunekit.quantize")
        out[f"{fqn}.weight"], out[f"{fqn}.weight_scale"] = q.int_repr(), scale
        if module.bias() is not None:
            out[f"{fqn}.bias"] = module.bias().detach()
    return out


def load_int8_state(model: nn.Module, state: dict[str, Tensor]) -> dict[str, Tensor]:
    """Set each quantized Linear from the tensors `int8_state` wrote (mutates `model`).

    Returns the other entries of `state`, plus each quantized layer's own updated state, ready
    for `model.load_state_dict`.
    """
    layers = {fqn: m for fqn, m in model.named_modules() if is_quantized_linear(m)}
    if not layers:
        return state
    rest = collections.OrderedDict(state)
    # Quantized layers read their format version from the metadata a real state_dict carries.
    rest._metadata = model.state_dict()._metadata  # type: ignore[attr-defined]
    for fqn, module in layers.items():
        weight, scale = rest.pop(f"{fqn}.weight"), rest.pop(f"{fqn}.weight_scale")
        bias = rest.pop(f"{fqn}.bias", None)
        qweight = torch._make_per_channel_quantized_tensor(
            weight, scale.double(), torch.zeros(len(scale), dtype=torch.int64), 0)
        module.set_weight_bias(qweight, bias)
        # Hand the layer's own (now updated) state back, for `load_state_dict` expects it.
        rest.update({f"{fqn}.{k}" if fqn else k: v for k, v in module.state_dict().items()})
    return rest
