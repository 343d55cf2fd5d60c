"""Hand-written (eager) attention: q @ k^T, softmax, @ v, with heads as the unit."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

import prunekit
from prunekit.structured import analyze, trace
from tests.structured.helpers import assert_equivalent


class EagerBlock(nn.Module):
    """One attention block written out with view/transpose/matmul, causal mask, then an MLP."""

    def __init__(self, dim: int = 32, heads: int = 4, spell_heads: bool = False) -> None:
        super().__init__()
        self.heads, self.head_dim, self.spell_heads = heads, dim // heads, spell_heads
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))
        self.fc1, self.fc2, self.out = nn.Linear(dim, 64), nn.Linear(64, dim), nn.Linear(dim, 3)

    def forward(self, x: Tensor) -> Tensor:
        b, t, _ = x.shape
        n = self.heads if self.spell_heads else -1  # -1 lets the head count follow the weights
        q, k, v = (f(x).view(b, t, n, self.head_dim).transpose(1, 2) for f in (self.q, self.k, self.v))
        scores = (q @ k.transpose(-2, -1)) * self.head_dim**-0.5
        scores = scores.masked_fill(~torch.ones(t, t, dtype=torch.bool).tril(), float("-inf"))
        y = (scores.softmax(dim=-1) @ v).transpose(1, 2).reshape(b, t, -1)
        x = x + self.o(y)
        x = x + self.fc2(torch.relu(self.fc1(x)))
        return self.out(x).mean(1)


def test_eager_heads_pruned_equivalently() -> None:
    torch.manual_seed(0)
    model, x = EagerBlock().eval(), torch.randn(2, 5, 32)
    plan = prunekit.plan(model, prunekit.ChannelConfig(ratio=0.5), x)
    heads = [g for g in plan.groups if g["kind"] == "head"]
    assert len(heads) == 1 and heads[0]["units"] == 4 and heads[0]["removed"] == 2, plan.summary()
    pruned = assert_equivalent(model, plan, x)
    assert pruned.q.out_features == pruned.k.out_features == pruned.v.out_features == pruned.o.in_features == 16


def test_view_that_spells_the_head_count_keeps_heads_and_says_why() -> None:
    torch.manual_seed(0)
    model, x = EagerBlock(spell_heads=True).eval(), torch.randn(2, 5, 32)
    graph = analyze(model, trace(model, x))
    assert not [g for g in graph.groups if g.kind == "head"]
    assert any("fixes the head count" in why for why in graph.blocked["q"]), graph.blocked
    plan = prunekit.plan(model, prunekit.ChannelConfig(ratio=0.5), x)
    assert_equivalent(model, plan, x)  # the MLP still shrinks; the model still runs


@pytest.mark.slow
def test_hf_bert_eager_attention_heads() -> None:
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.BertConfig(
        vocab_size=100, hidden_size=48, num_hidden_layers=2, num_attention_heads=6, intermediate_size=96
    )
    cfg._attn_implementation = "eager"  # q @ k^T, softmax, @ v in transformers' eager_attention_forward
    model = transformers.BertModel(cfg).eval()
    x = {"input_ids": torch.randint(0, 100, (2, 7)), "attention_mask": torch.ones(2, 7, dtype=torch.long)}
    assert any(n.target is torch.ops.aten.matmul.default for n in trace(model, x).graph.nodes)
    plan = prunekit.plan(model, prunekit.ChannelConfig(ratio=0.5), x)
    assert sum(g["removed"] for g in plan.groups if g["kind"] == "head") == 6, plan.summary()  # 3 of 6 per layer
    assert_equivalent(model, plan, x, atol=1e-4)


class PermutedWithHeadBias(EagerBlock):
    """permute/matmul spelling; with `head_bias`, a per-head constant is added to the scores."""

    def __init__(self, head_bias: bool) -> None:
        super().__init__()
        self.head_bias = head_bias

    def forward(self, x: Tensor) -> Tensor:
        b, t, _ = x.shape
        q = self.q(x).reshape(b, t, -1, 8).permute(0, 2, 1, 3)
        k = self.k(x).reshape(b, t, -1, 8).permute(0, 2, 3, 1)
        v = self.v(x).reshape(b, t, -1, 8).permute(0, 2, 1, 3)
        scores = torch.matmul(q, k) / 3
        if self.head_bias:  # a constant per head cannot shrink with the heads: they must stay
            scores = scores + torch.arange(4.0).view(1, 4, 1, 1)
        y = torch.matmul(scores.softmax(dim=-1), v).permute(0, 2, 1, 3).contiguous().view(b, t, -1)
        x = x + self.o(y)
        return self.out(x + self.fc2(torch.relu(self.fc1(x)))).mean(1)


@pytest.mark.parametrize("head_bias", [False, True])
def test_permute_spelling_and_per_head_constants(head_bias: bool) -> None:
    torch.manual_seed(0)
    model, x = PermutedWithHeadBias(head_bias).eval(), torch.randn(2, 5, 32)
    plan = prunekit.plan(model, prunekit.ChannelConfig(ratio=0.5), x)
    removed = sum(g["removed"] for g in plan.groups if g["kind"] == "head")
    assert removed == (0 if head_bias else 2), plan.summary()
    assert_equivalent(model, plan, x)
