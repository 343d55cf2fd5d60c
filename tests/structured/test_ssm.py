"""Inner-channel pruning of Mamba (v1) state-space models (`StateSpaceConfig`).

Tiny random models (hidden 64, d_inner 128, d_state 8, 2 blocks, vocab 256). The pinned
invariants: the pruned model equals the dense model with the removed channels zeroed (and the
zeroing that proves it is the right one); parameters drop by the exact count; `save_pretrained`
/ `from_pretrained` and `prunekit.save` / `prunekit.load` rebuild it; plans do not mutate,
apply all-or-nothing and serialise; bad input names the field, value or model class.
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
from prunekit.errors import CalibrationError, ConfigError, PlanError
from prunekit.structured.llm import LLMPlan
from prunekit.structured.ssm import StateSpaceConfig, StateSpaceStep, ssm_channel_importance
from tests.structured.helpers import PROBE_IDS as X
from tests.structured.helpers import lm_logits as _logits
from tests.structured.helpers import token_batches as _data

transformers = pytest.importorskip("transformers")

H, D_INNER, N, R, K, LAYERS = 64, 128, 8, 4, 4, 2  # R: time_step_rank = ceil(64 / 16)


def _model(family: str = "mamba", seed: int = 0, **kw: Any) -> Any:
    cls = {"mamba": transformers.MambaConfig, "falcon_mamba": transformers.FalconMambaConfig}[family]
    config = cls(hidden_size=H, state_size=N, num_hidden_layers=LAYERS, vocab_size=256, conv_kernel=K, **kw)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():  # HF sets conv biases to 0 and D to 1: give every tensor structure
        for name, p in model.named_parameters():
            if name.endswith(("conv1d.bias", ".D", "norm.weight", "in_proj.bias", "out_proj.bias")):
                p.uniform_(0.5, 1.5) if "norm" in name else p.normal_(0.0, 0.5)
    return model


def _removed(plan: LLMPlan) -> list[list[int]]:
    step = plan.steps[0]
    assert isinstance(step, StateSpaceStep)
    return [sorted(set(range(D_INNER)) - set(k)) for k in step.keep]


def _zero(model: Any, removed: list[list[int]], scheme: str) -> Any:
    """The dense model with the `removed` channels zeroed as `scheme` says (returns a copy)."""
    model = copy.deepcopy(model)
    with torch.no_grad():
        for i, gone in enumerate(removed):
            m = model.backbone.layers[i].mixer
            if scheme == "conv+out_proj":  # conv outputs silu(0) = 0, and out_proj never reads the channel
                m.conv1d.weight[gone] = 0
                m.conv1d.bias[gone] = 0
                m.out_proj.weight[:, gone] = 0
            else:  # "in_proj": x and z rows only; the conv bias still feeds x_proj
                m.in_proj.weight[gone] = 0
                m.in_proj.weight[[D_INNER + c for c in gone]] = 0
                if scheme == "in_proj+conv_bias":
                    m.conv1d.bias[gone] = 0
    return model


@pytest.mark.parametrize("family", ["mamba", "falcon_mamba"])
@pytest.mark.parametrize("criterion", ["activation", "l1"])
def test_pruned_equals_zeroed_dense_and_plan_is_pure(family: str, criterion: str) -> None:
    model = _model(family)
    dense = {k: v.clone() for k, v in model.state_dict().items()}
    plan = prunekit.plan(model, StateSpaceConfig(ratio=0.3, criterion=criterion), data=_data())
    assert all(torch.equal(v, dense[k]) for k, v in model.state_dict().items())  # plan never mutates
    assert model.config.intermediate_size == D_INNER
    zeroed = _zero(model, _removed(plan), "conv+out_proj")
    plan.apply(model)
    assert model.config.intermediate_size == 90 and model.backbone.layers[1].mixer.intermediate_size == 90
    torch.testing.assert_close(_logits(model), _logits(zeroed), rtol=1e-5, atol=1e-5)


def test_which_zeroing_is_equivalent() -> None:
    """Zeroing in_proj's x and z rows is not enough: the conv bias reaches x_proj (dt, B, C)."""
    model = _model()
    plan = prunekit.plan(model, StateSpaceConfig(ratio=0.3))
    removed = _removed(plan)
    pruned = plan.apply(copy.deepcopy(model))
    torch.testing.assert_close(_logits(pruned), _logits(_zero(model, removed, "in_proj+conv_bias")))
    assert not torch.allclose(_logits(pruned), _logits(_zero(model, removed, "in_proj")), atol=1e-4)


def test_removes_the_lowest_scored_channels() -> None:
    model, data = _model(), _data()
    by = {"activation": ssm_channel_importance(model, data), "l1": ssm_channel_importance(model)}
    for criterion, scores in by.items():
        plan = prunekit.plan(model, StateSpaceConfig(ratio=0.25, criterion=criterion), data=data)
        for s, gone in zip(scores, _removed(plan), strict=True):
            kept = [c for c in range(D_INNER) if c not in gone]
            assert len(gone) == 32 and float(s[gone].max()) <= float(s[kept].min())
    auto = prunekit.plan(model, StateSpaceConfig(ratio=0.25))  # no data: weight-only
    assert auto.steps[0].scored_by == "l1"  # type: ignore[attr-defined]


@pytest.mark.parametrize("use_bias", [False, True])
def test_params_drop_by_the_exact_count(use_bias: bool) -> None:
    model = _model(use_bias=use_bias)
    before = sum(p.numel() for p in model.parameters())
    plan = prunekit.plan(model, StateSpaceConfig(ratio=0.3, round_to=8))
    removed = D_INNER - 96  # 128 - round(38.4) = 90 kept, rounded up to 96
    # per channel: in_proj x and z rows (+ biases), conv filter + bias, x_proj column,
    # dt_proj row + bias, A_log row, D, out_proj column
    per_channel = 2 * H + 2 * use_bias + K + 1 + (R + 2 * N) + R + 1 + N + 1 + H
    expected = LAYERS * removed * per_channel
    assert plan.stats["params_before"] - plan.stats["params_after"] == expected
    plan.apply(model)
    assert before - sum(p.numel() for p in model.parameters()) == expected
    assert model.backbone.layers[0].mixer.conv1d.groups == 96


def test_save_pretrained_round_trip_and_cached_generation(tmp_path: Path) -> None:
    model = _model()
    plan = prunekit.plan(model, StateSpaceConfig(ratio=0.3), data=_data())
    zeroed = _zero(model, _removed(plan), "conv+out_proj")
    plan.apply(model)
    model.save_pretrained(tmp_path)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert loaded.config.intermediate_size == 90 and loaded.config.expand == 2
    torch.testing.assert_close(_logits(loaded), _logits(model), rtol=0, atol=0)
    ids = X[:1, :5]  # the cached decode path (one token at a time, conv and SSM state) agrees too
    out = [m.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=0) for m in (loaded, zeroed)]
    assert torch.equal(out[0], out[1])


def test_prunekit_save_and_load_replay_the_plan(tmp_path: Path) -> None:
    model = _model()
    plan = prunekit.plan(model, StateSpaceConfig(ratio=0.3), data=_data())
    plan.apply(model)
    path = tmp_path / "mamba.safetensors"
    prunekit.save(model, path, plan=plan)
    loaded = prunekit.load(path, lambda: _model(seed=5))  # a fresh dense model of other weights
    assert loaded.config.intermediate_size == 90
    torch.testing.assert_close(_logits(loaded), _logits(model), rtol=0, atol=0)


def test_plan_serialises_and_replays() -> None:
    model = _model()
    plan = prunekit.plan(model, StateSpaceConfig(ratio=0.3, criterion="activation"), data=_data())
    again = LLMPlan.from_dict(json.loads(json.dumps(plan.to_dict())))
    assert again.to_dict() == plan.to_dict()
    torch.testing.assert_close(_logits(again.apply(copy.deepcopy(model))), _logits(plan.apply(model)))
    bad = plan.to_dict()
    bad["steps"][0]["keep"][1] = bad["steps"][0]["keep"][1][:-1]  # blocks must keep equal counts
    with pytest.raises(PlanError, match="equally long"):
        LLMPlan.from_dict(bad)
    cfg = StateSpaceConfig(ratio=0.3, round_to=8)
    assert config_from_dict(config_to_dict(cfg), "test") == cfg


def test_apply_is_all_or_nothing() -> None:
    model = _model()
    plan = prunekit.plan(model, StateSpaceConfig(ratio=0.3))
    before, logits = {k: v.clone() for k, v in model.state_dict().items()}, _logits(model)
    # the second step was planned for d_inner 128, which the first step has just changed
    with pytest.raises(PlanError, match="intermediate_size"):
        plan.then(plan).apply(model)
    assert model.state_dict().keys() == before.keys()
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert model.config.intermediate_size == D_INNER and model.backbone.layers[0].mixer.conv1d.groups == D_INNER
    torch.testing.assert_close(_logits(model), logits, rtol=0, atol=0)


def test_bad_input_names_the_field_or_model() -> None:
    model = _model()
    with pytest.raises(ConfigError, match=r"ratio: 0.999 would remove all 128 inner channels"):
        prunekit.plan(model, StateSpaceConfig(ratio=0.999))
    with pytest.raises(ConfigError, match="ratio"):
        StateSpaceConfig(ratio=1.0)
    with pytest.raises(ConfigError, match="ratoi"):
        StateSpaceConfig(ratoi=0.3)  # type: ignore[call-arg]
    with pytest.raises(CalibrationError, match="calibration data"):
        prunekit.plan(model, StateSpaceConfig(ratio=0.3, criterion="activation"))
    llama = transformers.LlamaForCausalLM(
        transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                 num_attention_heads=2, num_key_value_heads=2, vocab_size=64)
    )
    with pytest.raises(ConfigError, match="LlamaForCausalLM has model_type 'llama'"):
        prunekit.plan(llama, StateSpaceConfig(ratio=0.3))
    mamba2 = transformers.Mamba2ForCausalLM(
        transformers.Mamba2Config(hidden_size=32, num_heads=4, head_dim=16, state_size=8, n_groups=1,
                                  num_hidden_layers=1, vocab_size=64, expand=2)
    )
    with pytest.raises(ConfigError, match=r"Mamba2ForCausalLM \(model_type 'mamba2'\) is not supported yet"):
        prunekit.plan(mamba2, StateSpaceConfig(ratio=0.3))
    pruned = prunekit.plan(model, StateSpaceConfig(ratio=0.3)).apply(copy.deepcopy(model))
    with pytest.raises(PlanError, match="already pruned"):
        prunekit.plan(model, StateSpaceConfig(ratio=0.3)).apply(pruned)
