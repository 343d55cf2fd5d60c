"""Mixture-of-experts compression (whole experts, expert FFN neurons) of Mixtral, Qwen2-MoE, OLMoE.

Tiny random models (hidden 64, 8 experts of width 96, top-2; Qwen2-MoE with a shared expert
and one dense `mlp_only_layers` block). The pinned invariants: removed neurons are the
lowest-ranked ones and the pruned model equals the dense model with them zeroed; removed
experts are the least routed ones and the pruned model equals the dense model whose router
never selects them; `save_pretrained` / `from_pretrained` and `prunekit.save` /
`prunekit.load` rebuild it; plans do not mutate and apply all-or-nothing; bad input names
the layer, the field and the value.
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
from prunekit.structured import llm
from prunekit.structured.llm import LLMPlan
from prunekit.structured.moe import ExpertConfig, ExpertStep
from prunekit.structured.moe_routing import expert_importance
from tests.structured.helpers import PROBE_IDS as X
from tests.structured.helpers import lm_logits as _logits
from tests.structured.helpers import token_batches as _data

transformers = pytest.importorskip("transformers")

FAMILIES = ["mixtral", "qwen2_moe", "olmoe"]
E, WIDTH, HIDDEN = 8, 96, 64


def _config(family: str) -> Any:
    sizes = dict(hidden_size=HIDDEN, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                 vocab_size=256, num_experts_per_tok=2, pad_token_id=0, eos_token_id=1, bos_token_id=1)
    if family == "mixtral":
        return transformers.MixtralConfig(intermediate_size=WIDTH, num_local_experts=E, **sizes)
    if family == "olmoe":
        return transformers.OlmoeConfig(intermediate_size=WIDTH, num_experts=E, **sizes)
    if family == "qwen3_moe":
        return transformers.Qwen3MoeConfig(moe_intermediate_size=WIDTH, num_experts=E, head_dim=16, **sizes)
    return transformers.Qwen2MoeConfig(  # a shared expert, and block 1 a plain dense MLP
        **{**sizes, "num_hidden_layers": 3}, moe_intermediate_size=WIDTH, intermediate_size=128,
        shared_expert_intermediate_size=80, num_experts=E, mlp_only_layers=[1], norm_topk_prob=False,
    )


def _model(family: str, seed: int = 0) -> Any:
    torch.manual_seed(seed)
    return transformers.AutoModelForCausalLM.from_config(_config(family)).eval()


def _blocks(model: Any) -> list[Any]:
    return [layer.mlp for layer in model.model.layers if hasattr(layer.mlp, "experts")]


def _params(model: Any) -> int:
    return sum(p.numel() for p in model.parameters())


def _round_trip(model: Any, tmp_path: Path) -> Any:
    model.save_pretrained(tmp_path)
    return transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()


def _never_select(model: Any, removed: list[list[int]]) -> Any:
    """The dense model whose routers never select `removed` (logit -inf), routing otherwise as HF does."""

    def hook(router: Any, _args: Any, out: Any, gone: list[int]) -> Any:
        logits = out[0].clone()
        logits[:, gone] = float("-inf")
        top, index = torch.topk(logits.float().softmax(-1), router.top_k, dim=-1)
        if getattr(router, "norm_topk_prob", True):  # Mixtral always renormalises
            top = top / top.sum(-1, keepdim=True)
        return out[0], top.to(out[1].dtype), index

    ref = copy.deepcopy(model)
    for block, gone in zip(_blocks(ref), removed, strict=True):
        block.gate.register_forward_hook(lambda m, a, o, gone=gone: hook(m, a, o, gone))
    return ref


def _routing_counts(model: Any, data: list[dict[str, torch.Tensor]]) -> list[torch.Tensor]:
    """Top-k selections per expert of every MoE block, counted with the test's own hooks."""
    counts = [torch.zeros(E) for _ in _blocks(model)]

    def count(into: torch.Tensor, out: Any) -> None:  # returns None: the router's output stays
        into += torch.bincount(out[2].flatten(), minlength=E)

    handles = [block.gate.register_forward_hook(lambda _m, _a, o, c=c: count(c, o))
               for block, c in zip(_blocks(model), counts, strict=True)]
    with torch.no_grad():
        for batch in data:
            model(**batch, use_cache=False)
    for h in handles:
        h.remove()
    return counts


# --------------------------------------------------------------------------------------------
# Neurons.


@pytest.mark.parametrize("family", FAMILIES)
def test_neurons_equal_zeroed_neurons(family: str, tmp_path: Path) -> None:
    model, data = _model(family), _data()
    plan = prunekit.plan(model, ExpertConfig(neurons_ratio=0.3), data=data)
    step = plan.steps[0]
    assert isinstance(step, ExpertStep) and step.experts is None
    assert {len(k) for n in step.neurons for k in n} == {72}  # 96 - round(28.8) = 67, rounded up to 8
    scores = expert_importance(model, data).neurons
    ref = copy.deepcopy(model)
    with torch.no_grad():
        for j, (block, kept) in enumerate(zip(_blocks(ref), step.neurons, strict=True)):
            assert kept[0] != kept[1] or kept[0] != kept[2]  # each expert chooses its own neurons
            for e, keep in enumerate(kept):
                gone = sorted(set(range(WIDTH)) - set(keep))
                assert float(scores[j, e, gone].max()) <= float(scores[j, e, keep].min())  # the lowest go
                block.experts.down_proj[e][:, gone] = 0
    pruned = plan.apply(copy.deepcopy(model))
    assert _params(model) - _params(pruned) == len(_blocks(model)) * E * 24 * 3 * HIDDEN
    assert plan.stats["params_after"] == _params(pruned)
    assert all(b.experts.intermediate_dim == 72 and b.experts.down_proj.shape == (E, HIDDEN, 72)
               for b in _blocks(pruned))
    torch.testing.assert_close(_logits(pruned), _logits(ref), atol=1e-5, rtol=1e-5)
    rebuilt = _round_trip(pruned, tmp_path)
    torch.testing.assert_close(_logits(rebuilt), _logits(ref), atol=1e-5, rtol=1e-5)
    if family == "qwen2_moe":  # the shared expert and the dense block are left alone
        assert pruned.config.moe_intermediate_size == 72 and pruned.config.intermediate_size == 128
        assert pruned.model.layers[0].mlp.shared_expert.up_proj.out_features == 80
        assert pruned.model.layers[1].mlp.up_proj.out_features == 128


def test_dead_neurons_are_the_ones_removed() -> None:
    """Neurons whose gate row is zero never fire (silu(0) = 0): removing them changes nothing."""
    model = _model("mixtral")
    dead = {e: [3 * e + 1, 50 + e, 70 - e, 90] for e in range(E)}
    with torch.no_grad():
        for block in _blocks(model):
            for e, rows in dead.items():
                block.experts.gate_up_proj[e, rows] = 0
    plan = prunekit.plan(model, ExpertConfig(neurons_ratio=4 / 96, round_to=4), data=_data())
    for kept in plan.steps[0].neurons:
        assert [sorted(set(range(WIDTH)) - set(k)) for k in kept] == [dead[e] for e in range(E)]
    torch.testing.assert_close(_logits(plan.apply(copy.deepcopy(model))), _logits(model), atol=1e-5, rtol=1e-5)


def test_experts_no_token_reached_are_ranked_by_weights(caplog: pytest.LogCaptureFixture) -> None:
    model, data = _model("mixtral"), [{"input_ids": torch.tensor([[5]])}]  # one token: 6 of 8 experts idle
    with caplog.at_level("WARNING", logger="prunekit.structured.moe"):
        plan = prunekit.plan(model, ExpertConfig(neurons_ratio=0.25), data=data)
    assert "no calibration token reached 12 kept expert(s)" in caplog.text
    idle = (expert_importance(model, data).tokens == 0).nonzero().tolist()
    assert len(idle) == 12
    for j, e in idle:
        experts = _blocks(model)[j].experts
        gate, up = experts.gate_up_proj[e].detach().chunk(2)
        score = gate.norm(dim=1) * up.norm(dim=1) * experts.down_proj[e].detach().norm(dim=0)
        keep = plan.steps[0].neurons[j][e]
        gone = sorted(set(range(WIDTH)) - set(keep))
        assert float(score[gone].max()) <= float(score[keep].min())


def test_padded_tokens_are_not_counted() -> None:
    """Right padding leaves the real tokens' states as they were (causal attention): the
    statistics of a padded batch are those of the unpadded tokens alone."""
    model = _model("olmoe")
    ids = _data(n=1, seq=12)[0]["input_ids"]
    mask = torch.ones_like(ids)
    mask[:, 8:] = 0
    padded = expert_importance(model, [{"input_ids": ids, "attention_mask": mask}])
    short = expert_importance(model, [{"input_ids": ids[:, :8]}])
    for name in ("frequency", "probability", "tokens", "neurons"):
        torch.testing.assert_close(getattr(padded, name), getattr(short, name), atol=1e-5, rtol=1e-4)
    assert float(short.tokens.sum()) == 2 * 8 * 2 * len(_blocks(model))  # top-2, two blocks


# --------------------------------------------------------------------------------------------
# Whole experts.


@pytest.mark.parametrize(("family", "criterion"), [("mixtral", "frequency"), ("qwen2_moe", "frequency"),
                                                   ("olmoe", "probability")])
def test_least_routed_experts_go_and_the_rest_route_as_before(family: str, criterion: str, tmp_path: Path) -> None:
    model, data = _model(family), _data()
    plan = prunekit.plan(model, ExpertConfig(experts_ratio=0.25, criterion=criterion), data=data)
    kept = plan.steps[0].experts
    removed = [sorted(set(range(E)) - set(k)) for k in kept]
    assert {len(r) for r in removed} == {2}
    if criterion == "frequency":
        for count, gone, keep in zip(_routing_counts(model, data), removed, kept, strict=True):
            assert float(count[gone].max()) <= float(count[keep].min())
    else:
        prob = expert_importance(model, data).probability
        for j, (gone, keep) in enumerate(zip(removed, kept, strict=True)):
            assert float(prob[j, gone].max()) <= float(prob[j, keep].min())
    pruned = plan.apply(copy.deepcopy(model))
    per_expert = 3 * WIDTH * HIDDEN + HIDDEN  # gate_up + down slices, and one router row
    assert _params(model) - _params(pruned) == len(_blocks(model)) * 2 * per_expert == \
        plan.stats["params_before"] - plan.stats["params_after"]
    assert all(b.gate.num_experts == 6 and b.experts.num_experts == 6 for b in _blocks(pruned))
    reference = _logits(_never_select(model, removed))
    assert not torch.allclose(reference, _logits(model), atol=1e-4)  # the forced routing does change something
    torch.testing.assert_close(_logits(pruned), reference, atol=1e-5, rtol=1e-5)
    rebuilt = _round_trip(pruned, tmp_path)
    field = "num_local_experts" if family == "mixtral" else "num_experts"
    assert getattr(rebuilt.config, field) == 6
    torch.testing.assert_close(_logits(rebuilt), reference, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", [*FAMILIES, "qwen3_moe"])
def test_experts_and_neurons_round_trip(family: str, tmp_path: Path) -> None:
    model = _model(family)
    plan = prunekit.plan(model, ExpertConfig(n_experts=2, neurons_ratio=0.3), data=_data())
    pruned = plan.apply(copy.deepcopy(model))
    assert _params(pruned) == plan.stats["params_after"]
    assert all(b.experts.gate_up_proj.shape == (6, 144, HIDDEN) for b in _blocks(pruned))
    with torch.no_grad():
        out = pruned.generate(X[:1, :4], max_new_tokens=3, do_sample=False)  # with the KV cache
    assert out.shape == (1, 7)
    torch.testing.assert_close(_logits(_round_trip(pruned, tmp_path)), _logits(pruned), atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------------------------------
# Plans: pure, atomic, serialisable.


def test_plans_do_not_mutate_and_apply_is_all_or_nothing() -> None:
    model = _model("qwen2_moe")
    state = {k: v.clone() for k, v in model.state_dict().items()}
    config = model.config.to_dict()
    first = prunekit.plan(model, ExpertConfig(experts_ratio=0.25), data=_data())
    second = prunekit.plan(model, ExpertConfig(neurons_ratio=0.5), data=_data())  # planned for 8 experts
    assert model.config.to_dict() == config
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    dense, params = _logits(model), dict(model.named_parameters())
    with pytest.raises(PlanError, match=r"num_experts 8 \(model has 6\)"):
        first.then(second).apply(model)  # the first step applies, the second refuses: rolled back
    assert model.config.to_dict() == config and model.model.layers[0].mlp.experts.num_experts == E
    assert all(p is params[k] for k, p in model.named_parameters())
    torch.testing.assert_close(_logits(model), dense, atol=0, rtol=0)
    first.apply(model)
    with pytest.raises(PlanError, match="already pruned"):
        first.apply(model)


def test_plan_serialises_and_replays(tmp_path: Path) -> None:
    model = _model("olmoe")
    plan = prunekit.plan(model, ExpertConfig(experts_ratio=0.25, neurons_ratio=0.3), data=_data())
    again = LLMPlan.load(plan.save(tmp_path / "plan.json"))
    assert again.to_dict() == plan.to_dict() and again.summary() == plan.summary()
    pruned = plan.apply(copy.deepcopy(model))
    fresh = again.apply(_model("olmoe", seed=3))  # another dense model of the same architecture
    fresh.load_state_dict(pruned.state_dict())
    torch.testing.assert_close(_logits(fresh), _logits(pruned), atol=0, rtol=0)


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe"])
def test_save_with_plan_and_load_replays(family: str, tmp_path: Path) -> None:
    model = _model(family)
    plan = prunekit.plan(model, ExpertConfig(n_experts=3, neurons_ratio=0.25), data=_data())
    pruned = plan.apply(copy.deepcopy(model))
    prunekit.save(pruned, tmp_path / "model.safetensors", plan=plan)
    rebuilt = prunekit.load(tmp_path / "model.safetensors", lambda: _model(family, seed=5))
    torch.testing.assert_close(_logits(rebuilt), _logits(pruned), atol=0, rtol=0)
    assert llm.replay_llm_plan(plan.to_dict(), rebuilt) is rebuilt  # already pruned: unchanged


def test_malformed_step_documents() -> None:
    doc = prunekit.plan(_model("mixtral"), ExpertConfig(n_experts=1, neurons_ratio=0.25), data=_data()).to_dict()
    step = doc["steps"][0]
    for bad in (
        {**step, "experts": [[2, 1, 3, 4, 5, 6, 7]] * 2},  # not ascending
        {**step, "experts": [[0, 1, 2, 3, 4, 5, 9]] * 2},  # no expert 9
        {**step, "experts": step["experts"][:1]},  # one list for two blocks
        {**step, "neurons": [n[:-1] for n in step["neurons"]]},  # a kept expert without neurons
        {**step, "neurons": [[n[:-1] for n in step["neurons"][0][:1]] + step["neurons"][0][1:]] * 2},  # widths differ
        {**step, "extra": 1},
    ):
        with pytest.raises(PlanError):
            LLMPlan.from_dict({**doc, "steps": [bad]})
    assert isinstance(LLMPlan.from_dict(doc).steps[0], ExpertStep)


def test_config_round_trips_as_recipe() -> None:
    cfg = ExpertConfig(n_experts=2, neurons_ratio=0.2, criterion="probability", round_to=16)
    assert config_from_dict(json.loads(json.dumps(config_to_dict(cfg)))) == cfg


# --------------------------------------------------------------------------------------------
# Bad input names the layer, the field and the value.


@pytest.mark.parametrize(
    ("config", "match"),
    [
        (ExpertConfig(n_experts=7), r"n_experts: 7 would leave 1 experts in every MoE layer \(e.g. "
                                    r"'model.layers.0.mlp'\), fewer than num_experts_per_tok 2"),
        (ExpertConfig(n_experts=8), r"n_experts: 8 would remove all 8 experts of every MoE layer"),
        (ExpertConfig(experts_ratio=0.9), r"experts_ratio: 0.9 would leave 1 experts"),
        (ExpertConfig(neurons_ratio=0.999), r"neurons_ratio: 0.999 would remove all 96 neurons of every expert "
                                            r"\(e.g. model.layers.0.mlp.experts\)"),
        (ExpertConfig(neurons_ratio=0.3, round_to=3), r"round_to: 3 gives an expert width of 69"),
    ],
)
def test_amounts_that_empty_a_layer(config: ExpertConfig, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        prunekit.plan(_model("mixtral"), config, data=_data())


def test_bad_configs_and_models() -> None:
    with pytest.raises(ConfigError, match="ExpertConfig.experts_ratio"):
        ExpertConfig(experts_ratio=1.0)
    with pytest.raises(ConfigError, match="ExpertConfig.neurons_ratio"):
        ExpertConfig(neurons_ratio=-0.1)
    with pytest.raises(ConfigError, match="at most one of n_experts"):
        ExpertConfig(n_experts=2, experts_ratio=0.25)
    with pytest.raises(ConfigError, match="ExpertConfig.experts"):
        ExpertConfig(experts=0.25)
    llama = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, vocab_size=256))
    with pytest.raises(ConfigError, match=r"LlamaForCausalLM \(model_type 'llama'\) has no supported mixture"):
        prunekit.plan(llama, ExpertConfig(n_experts=1), data=_data())
    dense_qwen = transformers.Qwen2MoeForCausalLM(transformers.Qwen2MoeConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
        vocab_size=256, mlp_only_layers=[0]))
    with pytest.raises(ConfigError, match="Qwen2MoeForCausalLM has no mixture-of-experts layers"):
        prunekit.plan(dense_qwen, ExpertConfig(n_experts=1), data=_data())
    with pytest.raises(CalibrationError, match="calibration data"):
        prunekit.plan(_model("mixtral"), ExpertConfig(n_experts=1))
