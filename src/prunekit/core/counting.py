"""What a model costs on paper: parameters and FLOPs of one forward, counted by PyTorch.

`ChannelPlan.summary` reports them before and after; the validation report and `compare_speed`
put them beside measured latency.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from prunekit.core.inputs import call_model


def count_params(model: nn.Module, *, nonzero: bool = False) -> int:
    """Number of parameters (shared ones once); `nonzero=True` counts only non-zero entries."""
    params = {id(p): p for p in model.parameters()}.values()
    if nonzero:
        return int(sum(int((p != 0).sum()) for p in params))
    return int(sum(p.numel() for p in params))


@torch.no_grad()
def count_flops(model: nn.Module, example_inputs: Any) -> int:
    """FLOPs of one forward on `example_inputs` (2 per multiply-add), counted by PyTorch.

    Uses `torch.utils.flop_counter.FlopCounterMode`, which counts matmuls, convolutions and
    attention; element-wise ops (activations, norms) are not counted, as in most FLOPs tables.

    Example:
        >>> count_flops(nn.Linear(4, 2, bias=False), torch.randn(1, 4))
        16
    """
    from torch.utils.flop_counter import FlopCounterMode

    was_training = model.training
    # nn.MultiheadAttention's fused fast path is invisible to the counter; count the math.
    fastpath = torch.backends.mha.get_fastpath_enabled()
    model.eval()
    try:
        torch.backends.mha.set_fastpath_enabled(False)
        counter = FlopCounterMode(display=False)
        with counter:
            call_model(model, example_inputs)
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)
        model.train(was_training)
    return int(counter.get_total_flops())
