"""Hugging Face architectures (tiny configs, random weights): heads, GQA, FFN, configs."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

import prunekit
from prunekit.structured.hf import shapes_config_cannot_rebuild, update_config
from tests.structured.helpers import assert_equivalent, run

transformers = pytest.importorskip("transformers")


def _tiny(name: str) -> tuple[torch.nn.Module, dict[str, torch.Tensor]]:
    torch.manual_seed(0)
    ids = {"input_ids": torch.randint(0, 100, (2, 7))}
    if name == "bert":
        cfg = transformers.BertConfig(
            vocab_size=100, hidden_size=48, num_hidden_layers=2, num_attention_heads=6, intermediate_size=96
        )
        return transformers.BertModel(cfg).eval(), ids
    if name == "llama":
        cfg = transformers.LlamaConfig(
            vocab_size=100,
            hidden_size=48,
            num_hidden_layers=2,
            num_attention_heads=6,
            num_key_value_heads=3,
            intermediate_size=96,
        )
        return transformers.LlamaForCausalLM(cfg).eval(), ids
    if name == "gpt2":
        cfg = transformers.GPT2Config(vocab_size=100, n_embd=48, n_layer=2, n_head=6, n_positions=32)
        return transformers.GPT2LMHeadModel(cfg).eval(), ids
    cfg = transformers.ViTConfig(
        image_size=16, patch_size=4, hidden_size=48, num_hidden_layers=2, num_attention_heads=6, intermediate_size=96
    )
    return transformers.ViTModel(cfg, add_pooling_layer=False).eval(), {"pixel_values": torch.randn(2, 3, 16, 16)}


@pytest.mark.parametrize("name", ["bert", "llama", "gpt2", "vit"])
@pytest.mark.parametrize("ratio", [0.3, 0.5])
def test_hf_heads_and_ffn_pruned_equivalently(name: str, ratio: float) -> None:
    model, x = _tiny(name)
    plan = prunekit.plan(model, prunekit.ChannelConfig(ratio=ratio), x)
    assert {g["kind"] for g in plan.groups} == {"head", "channel"}, plan.summary()
    removed = {g["kind"] for g in plan.groups if g["removed"]}
    assert removed == ({"channel"} if (name, ratio) == ("llama", 0.3) else {"head", "channel"})  # 3 kv heads
    assert_equivalent(model, plan, x, atol=1e-4)


def test_llama_gqa_query_heads_follow_kv_heads() -> None:
    model, x = _tiny("llama")
    plan = prunekit.plan(model, prunekit.ChannelConfig(ratio=0.5), x)
    pruned = plan.apply(copy.deepcopy(model))
    attn = pruned.model.layers[0].self_attn
    assert attn.k_proj.out_features // attn.head_dim == 2  # 3 kv heads, 1 removed
    assert attn.q_proj.out_features // attn.head_dim == 4  # its 2 query heads went with it
    assert pruned.config.num_key_value_heads == 2 and pruned.config.num_attention_heads == 4


@pytest.mark.parametrize("name", ["llama", "vit"])
def test_save_pretrained_round_trip(name: str, tmp_path: Path) -> None:
    model, x = _tiny(name)
    pruned = prunekit.prune(model, prunekit.ChannelConfig(ratio=0.5), example_inputs=x)
    pruned.save_pretrained(tmp_path)
    cls = type(pruned)
    again = cls.from_pretrained(tmp_path).eval()
    torch.testing.assert_close(run(again, x), run(pruned, x))


@pytest.mark.parametrize("name", ["bert", "gpt2"])
def test_ffn_pruned_bert_gpt2_round_trip_save_pretrained(name: str, tmp_path: Path) -> None:
    model, x = _tiny(name)
    pruned = prunekit.prune(model, prunekit.ChannelConfig(ratio=0.5, head_ratio=0.0), example_inputs=x)
    assert update_config(pruned) == []
    pruned.save_pretrained(tmp_path)
    again = type(pruned).from_pretrained(tmp_path).eval()
    torch.testing.assert_close(run(again, x), run(pruned, x))


@pytest.mark.parametrize("name", ["bert", "gpt2"])
def test_head_pruned_bert_gpt2_say_so_and_reload_through_prunekit(name: str, tmp_path: Path) -> None:
    # transformers 5 derives their head size from hidden_size // heads and dropped pruned_heads:
    # no config can describe fewer heads, so from_pretrained must fail loudly, never load silently.
    model, x = _tiny(name)
    dense_config = copy.deepcopy(model.config)
    plan = prunekit.plan(model, prunekit.ChannelConfig(ratio=0.5), x)
    pruned = plan.apply(copy.deepcopy(model)).eval()
    assert "head_dim" in update_config(pruned)
    assert any(k.endswith(("c_attn.weight", "query.weight")) for k in shapes_config_cannot_rebuild(pruned))
    pruned.save_pretrained(tmp_path / "hf")
    with pytest.raises(RuntimeError, match="mismatch"):
        type(pruned).from_pretrained(tmp_path / "hf")
    prunekit.save(pruned, tmp_path / "small.safetensors", plan=plan)
    again = prunekit.load(tmp_path / "small.safetensors", lambda: type(model)(dense_config)).eval()
    torch.testing.assert_close(run(again, x), run(pruned, x))
