"""Shared checks for structured-pruning tests: zero what a plan removes, compare outputs."""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from prunekit.structured import ChannelPlan


def zeroed_copy(model: nn.Module, plan: ChannelPlan) -> nn.Module:
    """A copy of `model` with every tensor slice the plan removes set to zero."""
    out = copy.deepcopy(model)
    tensors = dict(out.named_parameters()) | dict(out.named_buffers())
    with torch.no_grad():
        for key, dims in plan.keep.items():
            t = tensors[key]
            for dim, keep in dims.items():
                gone = sorted(set(range(t.shape[dim])) - set(keep))
                t.index_fill_(dim, torch.tensor(gone, dtype=torch.long), 0.0)
    return out


def run(model: nn.Module, inputs: Any) -> torch.Tensor:
    """The model's main output tensor on `inputs` (HF outputs: the first tensor)."""
    with torch.no_grad():
        out = model(**inputs) if isinstance(inputs, dict) else model(inputs)
    if isinstance(out, torch.Tensor):
        return out
    if hasattr(out, "logits") and out.logits is not None:
        return out.logits
    return out[0]


def assert_equivalent(model: nn.Module, plan: ChannelPlan, inputs: Any, atol: float = 1e-5) -> nn.Module:
    """Apply `plan` to a copy; its outputs must match the zeroed dense model's. Returns it."""
    model.eval()
    reference = run(zeroed_copy(model, plan), inputs)
    pruned = plan.apply(copy.deepcopy(model)).eval()
    torch.testing.assert_close(run(pruned, inputs), reference, atol=atol, rtol=1e-4)
    return pruned


def token_batches(n: int = 2, seq: int = 16, seed: int = 1, vocab: int = 256) -> list[dict[str, torch.Tensor]]:
    """`n` calibration batches of random token ids (2 sequences of `seq` each), seeded."""
    g = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(0, vocab, (2, seq), generator=g)} for _ in range(n)]


PROBE_IDS = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(7))


def lm_logits(model: Any, x: torch.Tensor = PROBE_IDS) -> torch.Tensor:
    """A causal LM's logits on `x`, without a KV cache."""
    with torch.no_grad():
        return model(input_ids=x, use_cache=False).logits
