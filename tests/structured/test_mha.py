"""PrunedMultiheadAttention computes what nn.MultiheadAttention does, for every mask option."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import prunekit
from prunekit.structured import PrunedMultiheadAttention
from prunekit.structured.layers import get_layer_handler


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("need_weights", [True, False])
@pytest.mark.parametrize("masks", ["none", "padding", "causal_bool", "additive"])
def test_same_outputs_as_torch(batch_first: bool, need_weights: bool, masks: str) -> None:
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(16, 4, batch_first=batch_first).eval()
    ours = copy.deepcopy(mha)
    get_layer_handler(ours).update(ours)  # no heads removed: only the class switches
    assert isinstance(ours, PrunedMultiheadAttention) and ours.head_dim == 4
    x = torch.randn(2, 5, 16) if batch_first else torch.randn(5, 2, 16)
    kwargs: dict = {}
    if masks == "padding":
        kwargs["key_padding_mask"] = torch.tensor([[False] * 4 + [True], [False] * 5])
    elif masks == "causal_bool":
        kwargs["attn_mask"] = torch.ones(5, 5, dtype=torch.bool).triu(1)
    elif masks == "additive":
        kwargs["attn_mask"] = torch.randn(5, 5)
    with torch.no_grad():
        want, want_w = mha(x, x, x, need_weights=need_weights, **kwargs)
        got, got_w = ours(x, x, x, need_weights=need_weights, **kwargs)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
    if need_weights:
        torch.testing.assert_close(got_w, want_w, atol=1e-5, rtol=1e-4)


def test_heads_removed_and_reloaded(tmp_path) -> None:  # noqa: ANN001
    from tests.models import TinyAttention

    torch.manual_seed(0)
    model, x = TinyAttention().eval(), torch.randn(2, 5, 32)
    plan = prunekit.plan(model, prunekit.ChannelConfig(ratio=0.5), x)
    pruned = plan.apply(copy.deepcopy(model))
    assert pruned.attn.num_heads == 2 and pruned.attn.in_proj_weight.shape == (48, 32)
    prunekit.save(pruned, tmp_path / "m.safetensors", plan=plan)
    again = prunekit.load(tmp_path / "m.safetensors", TinyAttention)
    torch.testing.assert_close(again.eval()(x), pruned(x))
