"""prunekit's CPU attention kernel against torch's SDPA, as an op under torch.compile, and in a transformers model."""

from __future__ import annotations

import copy

import pytest
import torch
from torch.nn import functional as F

import prunekit as pk
from prunekit.errors import UnsupportedLayerError
from prunekit.runtime import attention

pytest.importorskip("numba")


def _heads(batch: int, heads: int, rows: int, dims: int, seed: int) -> torch.Tensor:
    """(B, H, S, D) as a model makes it: a view of (B, S, H * D), heads interleaved in memory."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, rows, heads * dims, generator=g).view(batch, rows, heads, dims).transpose(1, 2)


@pytest.mark.parametrize(
    ("batch", "heads", "kv_heads", "rows", "keys", "dims"),
    [(1, 12, 12, 128, 128, 32), (2, 4, 4, 17, 17, 64), (1, 2, 2, 16, 5, 16), (3, 6, 2, 37, 100, 48),
     (1, 1, 1, 129, 129, 64), (2, 3, 3, 64, 200, 16)],
)
def test_matches_sdpa_without_mask(batch: int, heads: int, kv_heads: int, rows: int, keys: int, dims: int) -> None:
    q = _heads(batch, heads, rows, dims, 0)
    k, v = _heads(batch, kv_heads, keys, dims, 1), _heads(batch, kv_heads, keys, dims, 2)
    with torch.no_grad():
        out = attention.attend(q, k, v)
        ref = F.scaled_dot_product_attention(q, k, v, enable_gqa=heads != kv_heads)
    assert out.shape == ref.shape == (batch, heads, rows, dims)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=2e-6)
    assert out.transpose(1, 2).is_contiguous()  # (B, S, H, D) in memory: merging the heads needs no copy


def test_additive_and_boolean_masks_and_scale() -> None:
    batch, heads, rows, dims = 2, 4, 40, 32
    q, k, v = (_heads(batch, heads, rows, dims, s) for s in range(3))
    padding = torch.zeros(batch, 1, 1, rows)
    padding[1, ..., -7:] = torch.finfo(torch.float32).min  # the second sequence is 7 tokens shorter
    causal = torch.ones(rows, rows, dtype=torch.bool).tril()
    per_head = torch.randn(1, heads, rows, rows)
    with torch.no_grad():
        for mask in (padding, causal, per_head):
            ref = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=0.3)
            torch.testing.assert_close(attention.attend(q, k, v, mask, scale=0.3), ref, rtol=1e-5, atol=2e-6)


def test_unsupported_inputs_name_the_problem() -> None:
    q = torch.randn(1, 2, 32, 24)  # 24 dims: not a multiple of 16
    with pytest.raises(UnsupportedLayerError, match="multiple of 16.*q \\(1, 2, 32, 24\\)"):
        attention.attend(q, q, q)
    few = torch.randn(1, 2, 3, 32)  # decoding: 3 query rows
    with pytest.raises(UnsupportedLayerError, match=">= 16 query rows"):
        attention.attend(few, few, few)
    wide = torch.randn(1, 2, 32, 32, dtype=torch.float64)
    assert not attention.supports(wide, *[torch.randn(1, 2, 32, 32)] * 2, None)
    trained = torch.randn(1, 2, 32, 32, requires_grad=True)
    assert not attention.supports(trained, trained, trained, None)
    q = torch.randn(1, 2, 32, 32)
    with pytest.raises(UnsupportedLayerError, match="mask \\(\\(1, 1, 32, 31\\)"):
        attention.attend(q, q, q, torch.zeros(1, 1, 32, 31))  # 31 keys for 32


def test_one_opaque_op_under_compile() -> None:
    q, k, v = (_heads(1, 4, 32, 32, s) for s in range(3))

    def block(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return attention.attend(q * 2.0, k, v).transpose(1, 2).flatten(-2).relu()

    graphs: list[torch.fx.GraphModule] = []

    def backend(gm: torch.fx.GraphModule, _inputs: list) -> object:
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    with torch.no_grad():
        out = torch.compile(block, backend=backend, fullgraph=True)(q, k, v)
        ref = F.scaled_dot_product_attention(q * 2.0, k, v).transpose(1, 2).flatten(-2).relu()
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=2e-6)
    ops = [n.target for g in graphs for n in g.graph.nodes if n.op == "call_function"]
    assert ops.count(torch.ops.prunekit.attention.default) == 1


def _tiny_bert() -> torch.nn.Module:
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    config = BertConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128,
                        vocab_size=100, max_position_embeddings=64)
    return BertModel(config, add_pooling_layer=False).eval()


def _bert_inputs(batch: int = 2, rows: int = 24) -> dict[str, torch.Tensor]:
    mask = torch.ones(batch, rows, dtype=torch.long)
    mask[-1, -5:] = 0  # padding in the last sequence
    return {"input_ids": torch.randint(0, 100, (batch, rows), generator=torch.Generator().manual_seed(0)),
            "attention_mask": mask}


def test_transformers_backend_matches_sdpa_and_falls_back() -> None:
    model, x = _tiny_bert(), _bert_inputs()
    fast = copy.deepcopy(model)
    assert attention.applies(fast) and attention.use_in(fast) == "sdpa"
    assert fast.config._attn_implementation == attention.BACKEND
    calls: list[int] = []
    original = attention._run
    attention._run = lambda *a: calls.append(1) or original(*a)  # type: ignore[assignment]
    try:
        with torch.no_grad():
            torch.testing.assert_close(fast(**x).last_hidden_state, model(**x).last_hidden_state, rtol=1e-4, atol=1e-5)
            assert len(calls) == 2  # one call per layer
            short = {k: t[:, :4] for k, t in x.items()}  # 4 rows: below MIN_QUERY_ROWS, SDPA runs
            torch.testing.assert_close(fast(**short).last_hidden_state, model(**short).last_hidden_state)
            assert len(calls) == 2
    finally:
        attention._run = original  # type: ignore[assignment]
    with pytest.raises(UnsupportedLayerError, match="Linear \\(attention backend None\\) does not take"):
        attention.use_in(torch.nn.Linear(2, 2))
    eager = _tiny_bert()
    eager.set_attn_implementation("eager")  # additive masks, attention weights: left alone
    assert not attention.applies(eager)
    with pytest.raises(UnsupportedLayerError, match="'eager'.*on the 'sdpa' backend"):
        attention.use_in(eager)


def test_accelerate_decides_on_the_attention_kernel_and_reports_it() -> None:
    model = _tiny_bert()
    x = _bert_inputs()
    sparse = pk.finalize(pk.prune(copy.deepcopy(model), pk.UnstructuredConfig(sparsity=0.9, scope="layer")))
    fast = pk.accelerate(copy.deepcopy(sparse), x, batch_sizes=(2,), repeats=3, warmup=1, verbose=False)
    report = fast.prunekit_acceleration
    kept = report.attention.split(" ")[0]
    assert kept in (attention.BACKEND, "sdpa") and fast.config._attn_implementation == kept
    assert "prunekit against sdpa, a forward: b2" in report.attention and "attention:" in report.summary()
    with torch.no_grad():
        torch.testing.assert_close(fast(**x).last_hidden_state, sparse(**x).last_hidden_state, rtol=1e-4, atol=1e-4)
    off = pk.accelerate(copy.deepcopy(sparse), x, batch_sizes=(2,), repeats=3, warmup=1, verbose=False,
                        attention_kernel=False)
    assert off.prunekit_acceleration.attention == "" and off.config._attn_implementation == "sdpa"


def test_accelerate_keeps_the_backend_when_the_kernel_would_take_no_call() -> None:
    model = _tiny_bert()
    x = _bert_inputs(batch=1, rows=4)  # 4 query rows: every call would go to SDPA
    sparse = pk.finalize(pk.prune(copy.deepcopy(model), pk.UnstructuredConfig(sparsity=0.9, scope="layer")))
    fast = pk.accelerate(sparse, x, batch_sizes=(1,), repeats=2, warmup=1, verbose=False)
    assert fast.config._attn_implementation == "sdpa"
    assert "kernel took none of the calls" in fast.prunekit_acceleration.attention
