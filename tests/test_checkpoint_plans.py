"""`pk.save(model, path, plan=...)` / `pk.load(path, build)` replay every kind of structured plan."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

import prunekit as pk


def _llama() -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=256)
    return LlamaForCausalLM(config).eval()


def _mlp() -> nn.Module:
    torch.manual_seed(1)
    return nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 16))


def test_llm_width_plan_round_trips_through_save_and_load(tmp_path: Path) -> None:
    model, data = _llama(), [torch.randint(0, 256, (1, 32)) for _ in range(4)]
    plan = pk.plan(model, pk.WidthConfig(ffn_ratio=0.5, heads_ratio=0.5), data=data)
    plan.apply(model)
    pk.save(model, tmp_path / "llm.safetensors", plan=plan)
    loaded = pk.load(tmp_path / "llm.safetensors", _llama)
    assert loaded.config.intermediate_size == model.config.intermediate_size < 128
    assert torch.equal(loaded(data[0]).logits, model(data[0]).logits)


def test_lowrank_plan_round_trips_through_save_and_load(tmp_path: Path) -> None:
    model = _mlp()
    plan = pk.plan(model, pk.LowRankConfig(rank=4), example_inputs=torch.randn(1, 32))
    plan.apply(model)
    pk.save(model, tmp_path / "lr.safetensors", plan=plan)
    loaded = pk.load(tmp_path / "lr.safetensors", _mlp)
    x = torch.randn(3, 32)
    assert pk.count_params(loaded) == pk.count_params(model) < pk.count_params(_mlp())
    assert torch.equal(loaded(x), model(x))
