"""Depth (ShortGPT / Gromov) and width (Minitron) compression of Llama-family models.

Tiny random models with grouped-query attention (4 query heads, 2 KV heads, 4 blocks). The
pinned invariants: removed units are the lowest-ranked ones; the pruned model equals the dense
model with the removed units zeroed (blocks made identity, heads and neurons zeroed);
`save_pretrained` / `from_pretrained` rebuild it with identical outputs; plans do not mutate,
apply all-or-nothing, serialise and replay; bad input names the field and value.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
import torch

import prunekit
from prunekit.config import config_from_dict, config_to_dict
from prunekit.deploy.checkpoint import read_checkpoint
from prunekit.errors import CalibrationError, ConfigError, PlanError
from prunekit.structured.depth import DepthConfig, DepthStep, angular_distances, block_influence
from prunekit.structured.llm import LLMPlan, replay_llm_plan
from prunekit.structured.width import WidthConfig, width_importance
from tests.structured.helpers import PROBE_IDS as X
from tests.structured.helpers import lm_logits as _logits
from tests.structured.helpers import token_batches as _data

transformers = pytest.importorskip("transformers")


def _config(family: str = "llama", tie: bool = False, **kw: Any) -> Any:
    sizes = dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        vocab_size=256,
        tie_word_embeddings=tie,
    )
    cls = {"llama": "LlamaConfig", "mistral": "MistralConfig", "qwen2": "Qwen2Config", "qwen3": "Qwen3Config"}
    return getattr(transformers, cls[family])(**{**sizes, **kw})


def _model(family: str = "llama", tie: bool = False, seed: int = 0, **kw: Any) -> Any:
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(_config(family, tie, **kw)).eval()
    with torch.no_grad():  # HF initialises norms to 1: give them structure so hidden ranking means something
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    return model


def _make_identity(model: Any, blocks: list[int]) -> None:
    """Zero the output projections of `blocks`: each then returns its input exactly."""
    with torch.no_grad():
        for i in blocks:
            model.model.layers[i].self_attn.o_proj.weight.zero_()
            model.model.layers[i].mlp.down_proj.weight.zero_()


def _round_trip(model: Any, tmp_path: Path) -> Any:
    model.save_pretrained(tmp_path)
    return type(model).from_pretrained(tmp_path).eval()


# --------------------------------------------------------------------------------------------
# Depth.


def test_block_influence_matches_hidden_states() -> None:
    model = _model()
    data = _data(1)
    with torch.no_grad():
        out = model(**data[0], output_hidden_states=True)
    hs = out.hidden_states  # embeddings, then each block's output (the last one after the final norm)
    for i in range(3):
        cos = torch.nn.functional.cosine_similarity(hs[i], hs[i + 1], dim=-1).mean()
        assert block_influence(model, data)[i] == pytest.approx(1 - float(cos), abs=1e-5)


@pytest.mark.parametrize("criterion", ["block_influence", "angular"])
def test_depth_removes_identity_blocks_exactly(criterion: str, tmp_path: Path) -> None:
    model = _model()
    _make_identity(model, [1, 2])
    dense = _logits(model)
    plan = prunekit.plan(model, DepthConfig(n_blocks=2, criterion=criterion), data=_data())
    assert plan.steps[0].removed == [1, 2], plan.summary()
    pruned = plan.apply(copy.deepcopy(model))
    assert len(pruned.model.layers) == 2 and pruned.config.num_hidden_layers == 2
    torch.testing.assert_close(_logits(pruned), dense, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(_logits(_round_trip(pruned, tmp_path)), dense, atol=1e-5, rtol=1e-5)
    assert plan.stats["params_after"] == sum(p.numel() for p in pruned.parameters())


def test_depth_criteria_differ_on_non_contiguous_redundancy() -> None:
    model = _model()
    _make_identity(model, [0, 2])
    data = _data()
    lowest = prunekit.plan(model, DepthConfig(n_blocks=2), data=data)
    contiguous = prunekit.plan(model, DepthConfig(n_blocks=2, criterion="angular"), data=data)
    assert lowest.steps[0].removed == [0, 2]
    removed = contiguous.steps[0].removed
    assert removed[1] - removed[0] == 1
    distances = angular_distances(model, data, 2)
    assert removed[0] == int(distances.argmin())


def test_depth_ratio_and_keep_blocks() -> None:
    model = _model()
    _make_identity(model, [1, 2])
    plan = prunekit.plan(model, DepthConfig(ratio=0.5, keep_blocks=(2,)), data=_data())
    assert 2 not in plan.steps[0].removed and len(plan.steps[0].removed) == 2


def test_depth_kv_cache_generation_after_removal() -> None:
    model = _model()
    pruned = prunekit.prune(copy.deepcopy(model), DepthConfig(n_blocks=2), data=_data())
    assert [layer.self_attn.layer_idx for layer in pruned.model.layers] == [0, 1]
    prompt = X[:1, :5]
    cached = pruned.generate(prompt, max_new_tokens=6, do_sample=False, use_cache=True)
    uncached = pruned.generate(prompt, max_new_tokens=6, do_sample=False, use_cache=False)
    assert torch.equal(cached, uncached)


# --------------------------------------------------------------------------------------------
# Width: pruned == dense with the removed units zeroed.


def _zeroed_heads(model: Any, kept: list[list[int]], hd: int = 16) -> Any:
    ref = copy.deepcopy(model)
    with torch.no_grad():
        for layer, keep in zip(ref.model.layers, kept, strict=True):
            for h in set(range(4)) - set(keep):
                layer.self_attn.o_proj.weight[:, h * hd : (h + 1) * hd] = 0
    return ref


@pytest.mark.parametrize("unit", ["query", "kv_group"])
def test_width_heads_equal_zeroed_heads(unit: str, tmp_path: Path) -> None:
    model = _model()
    data = _data()
    plan = prunekit.plan(model, WidthConfig(heads_ratio=0.5, head_unit=unit), data=data)
    step = plan.steps[0]
    scores = width_importance(model, data).heads
    for i, keep in enumerate(step.heads):
        if unit == "query":  # one head of each KV group, the better-scored one
            assert keep == [g * 2 + int(scores[i, g * 2 : g * 2 + 2].argmax()) for g in range(2)]
        else:  # one whole group, the better-scored one
            best = int(scores[i].view(2, 2).sum(dim=1).argmax())
            assert keep == [best * 2, best * 2 + 1] and step.kv_heads[i] == [best]
    pruned = plan.apply(copy.deepcopy(model))
    assert pruned.config.num_attention_heads == 2
    assert pruned.config.num_key_value_heads == (2 if unit == "query" else 1)
    reference = _logits(_zeroed_heads(model, step.heads))
    torch.testing.assert_close(_logits(pruned), reference, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(_logits(_round_trip(pruned, tmp_path)), reference, atol=1e-5, rtol=1e-5)


def test_width_ffn_equals_zeroed_neurons(tmp_path: Path) -> None:
    model = _model()
    data = _data()
    plan = prunekit.plan(model, WidthConfig(ffn_ratio=0.3, round_to=8), data=data)
    kept = plan.steps[0].ffn
    assert {len(k) for k in kept} == {96}  # 128 - round(38.4) = 90, rounded up to a multiple of 8
    scores = width_importance(model, data).ffn
    ref = copy.deepcopy(model)
    with torch.no_grad():
        for i, (layer, keep) in enumerate(zip(ref.model.layers, kept, strict=True)):
            gone = sorted(set(range(128)) - set(keep))
            assert float(scores[i, gone].max()) <= float(scores[i, keep].min())  # the lowest go
            layer.mlp.down_proj.weight[:, gone] = 0
    pruned = plan.apply(copy.deepcopy(model))
    assert pruned.config.intermediate_size == 96 and pruned.model.layers[0].mlp.intermediate_size == 96
    torch.testing.assert_close(_logits(pruned), _logits(ref), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(_logits(_round_trip(pruned, tmp_path)), _logits(ref), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("tie", [False, True])
def test_width_hidden_removes_dead_channels(tie: bool, tmp_path: Path) -> None:
    """RMSNorm divides by the mean square over channels, so removing a channel is not exactly
    zeroing it; removing channels that are zero everywhere only rescales by sqrt(64/60)."""
    model = _model(tie=tie)
    dead = [3, 13, 40, 41]  # four: LlamaConfig wants hidden_size a multiple of the 4 heads
    with torch.no_grad():
        model.model.embed_tokens.weight[:, dead] = 0
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight[dead] = 0
            layer.mlp.down_proj.weight[dead] = 0
    plan = prunekit.plan(model, WidthConfig(hidden_ratio=4 / 64), data=_data())
    assert plan.steps[0].hidden == [c for c in range(64) if c not in dead]
    pruned = plan.apply(copy.deepcopy(model))
    assert pruned.config.hidden_size == 60 and pruned.model.embed_tokens.weight.shape == (256, 60)
    assert pruned.lm_head.weight.shape == (256, 60) and pruned.model.norm.weight.shape == (60,)
    assert pruned.model.layers[0].self_attn.q_proj.weight.shape == (64, 60)
    assert pruned.model.layers[0].mlp.down_proj.weight.shape == (128, 60)[::-1]
    assert (pruned.lm_head.weight is pruned.model.embed_tokens.weight) == tie
    dense, small = _logits(model), _logits(pruned)
    assert torch.isfinite(small).all()
    assert float((small - dense).abs().max()) < 0.1 * float(dense.abs().max())
    torch.testing.assert_close(_logits(_round_trip(pruned, tmp_path)), small, atol=1e-5, rtol=1e-5)
    assert plan.stats["params_after"] == sum({id(p): p.numel() for p in pruned.parameters()}.values())


@pytest.mark.parametrize(("family", "hidden"), [("llama", 52), ("mistral", 51)])
def test_hidden_width_rounded_up_to_what_the_config_accepts(family: str, hidden: int, tmp_path: Path) -> None:
    """transformers 5's LlamaConfig refuses hidden_size % num_attention_heads != 0; Mistral's does not."""
    model = _model(family)
    pruned = prunekit.prune(copy.deepcopy(model), WidthConfig(hidden_ratio=0.2), data=_data())  # 64 - 13 = 51
    assert pruned.config.hidden_size == hidden
    torch.testing.assert_close(_logits(_round_trip(pruned, tmp_path)), _logits(pruned), atol=1e-5, rtol=1e-5)
    three_heads = _model(hidden_size=48, num_attention_heads=3, num_key_value_heads=1)
    with pytest.raises(ConfigError, match="round_to 8: no hidden_size from 40 below 48 passes LlamaConfig"):
        prunekit.plan(three_heads, WidthConfig(hidden_ratio=0.3, round_to=8), data=_data())


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2", "qwen3"])
def test_depth_then_width_round_trips_through_from_pretrained(family: str, tmp_path: Path) -> None:
    # llama: biases on every projection; qwen2: its own q/k/v biases and a tied head
    extra = {"attention_bias": True, "mlp_bias": True} if family == "llama" else {}
    model = _model(family, tie=family == "qwen2", **extra)
    data = _data()
    depth = prunekit.plan(model, DepthConfig(n_blocks=1), data=data)
    shallow = depth.apply(copy.deepcopy(model))
    width = prunekit.plan(shallow, WidthConfig(heads_ratio=0.5, ffn_ratio=0.25, hidden_ratio=0.25), data=data)
    both = depth.then(width)
    pruned = both.apply(copy.deepcopy(model))
    assert pruned.config.num_hidden_layers == 3 and pruned.config.hidden_size == 48
    if getattr(pruned.config, "layer_types", None) is not None:
        assert len(pruned.config.layer_types) == 3
    torch.testing.assert_close(_logits(pruned), _logits(width.apply(shallow)), atol=0, rtol=0)
    torch.testing.assert_close(_logits(_round_trip(pruned, tmp_path)), _logits(pruned), atol=1e-5, rtol=1e-5)
    assert both.stats["params_after"] == sum({id(p): p.numel() for p in pruned.parameters()}.values())
    assert "params" in both.summary() and "without embeddings" in both.summary()


# --------------------------------------------------------------------------------------------
# Plans: pure, atomic, serialisable.


def test_plans_do_not_mutate() -> None:
    model = _model(tie=True)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    config = model.config.to_dict()
    prunekit.plan(model, DepthConfig(n_blocks=2), data=_data())
    prunekit.plan(model, WidthConfig(heads_ratio=0.5, ffn_ratio=0.5, hidden_ratio=0.5), data=_data())
    assert model.config.to_dict() == config and len(model.model.layers) == 4
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key]), key


def test_apply_is_all_or_nothing() -> None:
    model = _model()
    data = _data()
    depth = prunekit.plan(model, DepthConfig(n_blocks=1), data=data)
    width = prunekit.plan(model, WidthConfig(ffn_ratio=0.5), data=data)  # planned for 4 blocks
    dense = _logits(model)
    params = {k: v for k, v in model.named_parameters()}
    with pytest.raises(PlanError, match="n_layers 4"):
        depth.then(width).apply(model)  # depth applies, then width finds 3 blocks: rolled back
    assert len(model.model.layers) == 4 and model.config.num_hidden_layers == 4
    assert all(p is params[k] for k, p in model.named_parameters())
    torch.testing.assert_close(_logits(model), dense, atol=0, rtol=0)
    depth.apply(model)
    with pytest.raises(PlanError, match="already pruned"):
        depth.apply(model)


def test_plan_serialises_and_replays(tmp_path: Path) -> None:
    model = _model(tie=True)
    data = _data()
    depth = prunekit.plan(model, DepthConfig(n_blocks=1), data=data)
    width = prunekit.plan(depth.apply(copy.deepcopy(model)), WidthConfig(heads_ratio=0.5, hidden_ratio=0.25), data=data)
    plan = depth.then(width)
    path = plan.save(tmp_path / "plan.json")
    again = LLMPlan.load(path)
    assert again.to_dict() == plan.to_dict() and again.summary() == plan.summary()
    pruned = plan.apply(copy.deepcopy(model))
    prunekit.save(pruned, tmp_path / "model.safetensors", plan=plan)
    state, user = read_checkpoint(tmp_path / "model.safetensors")
    fresh = _model(tie=True, seed=3)  # another dense model of the same architecture
    rebuilt = replay_llm_plan(user["channel_plan"], fresh)
    rebuilt.load_state_dict(state)
    torch.testing.assert_close(_logits(rebuilt), _logits(pruned), atol=0, rtol=0)
    assert replay_llm_plan(user["channel_plan"], rebuilt) is rebuilt  # already pruned: unchanged


def test_configs_round_trip_as_recipes() -> None:
    for cfg in (DepthConfig(ratio=0.25, criterion="angular", keep_blocks=(0, 3)), WidthConfig(ffn_ratio=0.2)):
        assert config_from_dict(json.loads(json.dumps(config_to_dict(cfg)))) == cfg
    assert DepthConfig(n_blocks=3).with_level(0.5) == DepthConfig(ratio=0.5)


def test_malformed_plan_documents() -> None:
    model = _model()
    doc = prunekit.plan(model, DepthConfig(n_blocks=1), data=_data()).to_dict()
    for bad in (
        {**doc, "version": 2},
        {**doc, "steps": [{"kind": "sideways"}]},
        {**doc, "steps": [{**doc["steps"][0], "keep": [2, 1]}]},
        {**doc, "steps": [{**doc["steps"][0], "keep": [9]}]},
    ):
        with pytest.raises(PlanError):
            LLMPlan.from_dict(bad)
    assert isinstance(LLMPlan.from_dict(doc).steps[0], DepthStep)


# --------------------------------------------------------------------------------------------
# Bad input names the field and the value.


@pytest.mark.parametrize(
    ("config", "match"),
    [
        (DepthConfig(n_blocks=4), r"n_blocks: 4 would remove all 4 decoder blocks of 'model.layers'"),
        (DepthConfig(ratio=0.9), r"ratio: 0.9 would remove all 4"),
        (DepthConfig(n_blocks=3, keep_blocks=(0, 1)), r"keep_blocks leaves only 2"),
        (DepthConfig(n_blocks=1, keep_blocks=(7,)), r"keep_blocks: 7 is not a block"),
        (WidthConfig(heads_ratio=0.8), r"heads_ratio: 0.8 would remove all 2 query heads of each KV group"),
        (WidthConfig(heads_ratio=0.8, head_unit="kv_group"), r"heads_ratio: 0.8 would remove all 2 KV groups"),
        (WidthConfig(ffn_ratio=0.999), r"ffn_ratio: 0.999 would remove all 128 FFN neurons"),
        (WidthConfig(hidden_ratio=0.995), r"hidden_ratio: 0.995 would remove all 64 hidden channels"),
    ],
)
def test_ratios_that_empty_a_dimension(config: Any, match: str) -> None:
    model = _model()
    with pytest.raises(ConfigError, match=match):
        prunekit.plan(model, config, data=_data())


def test_bad_configs_and_models() -> None:
    with pytest.raises(ConfigError, match="exactly one of n_blocks"):
        DepthConfig(n_blocks=2, ratio=0.5)
    with pytest.raises(ConfigError, match="WidthConfig.heads_ratio"):
        WidthConfig(heads_ratio=1.0)
    with pytest.raises(ConfigError, match="ffn_ratios"):
        WidthConfig(ffn_ratios=0.5)
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=256, n_embd=32, n_layer=2, n_head=2))
    for cfg in (DepthConfig(n_blocks=1), WidthConfig(ffn_ratio=0.5)):
        with pytest.raises(ConfigError, match="model_type 'gpt2'"):
            prunekit.plan(gpt2, cfg, data=_data())
    with pytest.raises(CalibrationError, match="calibration data"):
        prunekit.plan(_model(), DepthConfig(n_blocks=1))
