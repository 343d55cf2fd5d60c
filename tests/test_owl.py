"""OWL (Yin et al. 2024): per-block sparsities from outlier ratios, on a tiny random Llama."""

from __future__ import annotations

import copy
import math
import threading
from collections.abc import Callable

import pytest
import torch
from torch import nn

import prunekit as pk
import prunekit.methods.calibration as calibration
from prunekit.allocation.owl import (
    OutlierDistribution,
    outlier_distribution,
    owl,
    owl_allocation,
    owl_sparsities,
)
from prunekit.errors import CalibrationError, ConfigError
from prunekit.methods.nm import NMConfig

transformers = pytest.importorskip("transformers")

BLOCKS = [f"model.layers.{i}" for i in range(4)]


@pytest.fixture(autouse=True)
def _one_thread():
    # The tiny model's ops are too small to split; a second thread only waits on a shared CPU.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_llama(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=256)
    return transformers.LlamaForCausalLM(config).eval()


def batches(n: int = 4, seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(0, 256, (1, 32), generator=g), "use_cache": False} for _ in range(n)]


def plant_outliers(model: nn.Module, block: int) -> None:
    """Make a few input channels of a block's attention inputs large, as LLMs' outlier features are.

    (Moderately: a single huge channel raises the block's mean score so much that its other
    outliers fall below M x the mean; it also floods later blocks through the residual stream.)
    """
    with torch.no_grad():
        model.model.layers[block].input_layernorm.weight[[5, 17, 33, 50]] *= 10.0


def weighted_mean(sparsities: dict[str, float], params: dict[str, int]) -> float:
    return math.fsum(params[b] * s for b, s in sparsities.items()) / math.fsum(params.values())


# --------------------------------------------------------------------------------------------
# The rule alone.


def _random_lod(seed: int) -> tuple[dict[str, float], dict[str, int]]:
    g = torch.Generator().manual_seed(seed)
    n = 3 + seed
    ratios = torch.rand(n, generator=g).pow(4)  # skewed: a few blocks hold most outliers
    sizes = torch.randint(1, 1000, (n,), generator=g) if seed % 2 else torch.full((n,), 7)
    blocks = [f"b{i}" for i in range(n)]
    d = {b: float(r) for b, r in zip(blocks, ratios, strict=True)}
    p = {b: int(s) for b, s in zip(blocks, sizes, strict=True)}
    return d, p


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize(("sparsity", "lam"), [(0.5, 0.08), (0.7, 0.08), (0.6, 0.2), (0.1, 0.04)])
def test_sparsities_average_to_the_target_and_spread_two_lam(seed: int, sparsity: float, lam: float) -> None:
    d, p = _random_lod(seed)
    s = owl_sparsities(d, p, sparsity, lam)
    assert list(s) == list(d)
    assert weighted_mean(s, p) == pytest.approx(sparsity, abs=1e-12)
    assert max(s.values()) - min(s.values()) == pytest.approx(2 * lam, abs=1e-12)
    _check_order(d, s)


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize(("sparsity", "lam"), [(0.5, 0.08), (0.7, 0.08), (0.6, 0.2), (0.1, 0.1)])
def test_clipped_sparsities_average_to_the_target_and_stay_in_the_band(seed: int, sparsity: float, lam: float) -> None:
    d, p = _random_lod(seed)
    s = owl_sparsities(d, p, sparsity, lam, clip=True)
    assert list(s) == list(d)
    assert weighted_mean(s, p) == pytest.approx(sparsity, abs=1e-12)
    assert all(sparsity - lam - 1e-12 <= v <= sparsity + lam + 1e-12 for v in s.values())
    _check_order(d, s)


def _check_order(d: dict[str, float], s: dict[str, float]) -> None:
    order = sorted(d, key=d.__getitem__)
    assert all(s[a] >= s[b] - 1e-12 for a, b in zip(order, order[1:], strict=False))  # more outliers, sparser never
    assert s[order[0]] > s[order[-1]]


def test_equal_blocks_follow_the_reference_code() -> None:
    # The reference code: n = 2 lam (D - min) / (max - min); S_l = S - (n_l - mean(n)).
    d = {"a": 0.010, "b": 0.020, "c": 0.025, "d": 0.030}
    lam, sparsity = 0.08, 0.6
    n = {b: 2 * lam * (v - 0.010) / 0.020 for b, v in d.items()}
    mean_n = sum(n.values()) / 4
    s = owl_sparsities(d, dict.fromkeys(d, 100), sparsity, lam)
    for b in d:
        assert s[b] == pytest.approx(sparsity - (n[b] - mean_n), abs=1e-12)
    assert s["a"] > sparsity + lam  # mean(n) = 0.09 > lam: the reference range is not S +- lam


def test_clipping_equals_the_reference_rule_when_that_is_centred() -> None:
    d = {"a": 0.010, "b": 0.015, "c": 0.025, "d": 0.030}  # mean(n) = lam exactly
    p = dict.fromkeys(d, 100)
    assert owl_sparsities(d, p, 0.6, 0.08, clip=True) == pytest.approx(owl_sparsities(d, p, 0.6, 0.08), abs=1e-12)


def test_a_skewed_distribution_is_clipped_to_the_band_and_keeps_the_average() -> None:
    d = {"a": 0.001, "b": 0.001, "c": 0.001, "first": 0.2}
    p = dict.fromkeys(d, 10)
    assert owl_sparsities(d, p, 0.7, 0.08)["first"] == pytest.approx(0.7 - 0.12)  # the reference rule
    s = owl_sparsities(d, p, 0.7, 0.08, clip=True)
    assert s["first"] == pytest.approx(0.62)
    assert s["a"] == s["b"] == s["c"] == pytest.approx((4 * 0.7 - 0.62) / 3)


def test_an_unclipped_sparsity_below_zero_is_refused_naming_the_block() -> None:
    d = {"a": 0.001, "b": 0.001, "c": 0.001, "first": 0.2}  # "first" would get 0.15 - 0.3 + 0.075 < 0
    with pytest.raises(ConfigError, match=r"OWL lam: 0.15 gives blocks \{'first': -0.075\}.*clip=True"):
        owl_sparsities(d, dict.fromkeys(d, 10), 0.15, 0.15)
    assert min(owl_sparsities(d, dict.fromkeys(d, 10), 0.15, 0.15, clip=True).values()) == pytest.approx(0.0)


@pytest.mark.parametrize(("d", "lam"), [({"a": 0.01, "b": 0.01}, 0.08), ({"a": 0.01, "b": 0.05}, 0.0)])
@pytest.mark.parametrize("clip", [False, True])
def test_equal_ratios_or_no_band_give_every_block_the_target(d: dict, lam: float, clip: bool) -> None:
    assert owl_sparsities(d, {"a": 3, "b": 5}, 0.5, lam, clip=clip) == {"a": 0.5, "b": 0.5}


@pytest.mark.parametrize(("lam", "sparsity"), [(-0.01, 0.5), (0.5, 0.5), (0.3, 0.2), (0.2, 0.85), (math.nan, 0.5)])
def test_lam_out_of_range_is_refused_naming_it(lam: float, sparsity: float) -> None:
    with pytest.raises(ConfigError, match=r"OWL lam: .* out of range for sparsity"):
        owl_sparsities({"a": 0.1, "b": 0.2}, {"a": 1, "b": 1}, sparsity, lam)


def test_mismatched_blocks_are_refused() -> None:
    with pytest.raises(ConfigError, match="same, non-empty set of blocks"):
        owl_sparsities({"a": 0.1, "b": 0.2}, {"a": 1}, 0.5, 0.05)
    with pytest.raises(ConfigError, match="no weights to prune"):
        owl_sparsities({"a": 0.1, "b": 0.2}, {"a": 1, "b": 0}, 0.5, 0.05)


# --------------------------------------------------------------------------------------------
# On a model.


def test_the_block_with_planted_outliers_gets_the_lowest_sparsity() -> None:
    model = tiny_llama()
    plant_outliers(model, 1)
    alloc = owl_allocation(model, pk.UnstructuredConfig(sparsity=0.6, criterion="wanda"), batches())
    ratios, s = alloc.distribution.ratios, alloc.sparsities
    assert list(s) == BLOCKS
    assert max(ratios, key=ratios.__getitem__) == "model.layers.1"
    assert ratios["model.layers.1"] > 1.3 * max(v for b, v in ratios.items() if b != "model.layers.1")
    assert min(s, key=s.__getitem__) == "model.layers.1" and s["model.layers.1"] < 0.6 - 0.05
    assert alloc.mean_sparsity == pytest.approx(0.6, abs=1e-12)
    assert max(s.values()) - min(s.values()) == pytest.approx(0.16)
    clipped = alloc.distribution.allocate(alloc.config, 0.08, clip=True).sparsities
    assert min(clipped, key=clipped.__getitem__) == "model.layers.1"
    assert all(0.52 - 1e-12 <= v <= 0.68 + 1e-12 for v in clipped.values())
    assert "model.layers.1" in alloc.summary() and alloc.as_dict()["blocks"]["model.layers.1"]["sparsity"] == s[
        "model.layers.1"]


def test_the_outlier_ratio_is_the_fraction_above_m_times_the_block_mean() -> None:
    model, data = tiny_llama(), batches()
    lod = outlier_distribution(model, pk.UnstructuredConfig(sparsity=0.5), data, m=2.0)
    block = model.model.layers[1]
    linears = {n: mod for n, mod in block.named_modules() if isinstance(mod, nn.Linear)}
    norms = {n: torch.zeros(mod.in_features) for n, mod in linears.items()}

    def record(name: str) -> Callable[..., None]:
        def hook(_m: nn.Module, inputs: tuple, _out: torch.Tensor) -> None:
            norms[name] += inputs[0].reshape(-1, inputs[0].shape[-1]).pow(2).sum(0)

        return hook

    hooks = [mod.register_forward_hook(record(n)) for n, mod in linears.items()]
    with torch.no_grad():
        for b in data:
            model(**b)
    for h in hooks:
        h.remove()
    scores = torch.cat([(mod.weight.abs() * norms[n].sqrt()).flatten() for n, mod in linears.items()])
    assert lod.ratios["model.layers.1"] == pytest.approx(float((scores > 2.0 * scores.mean()).float().mean()), abs=1e-4)
    assert lod.params["model.layers.1"] == scores.numel() and lod.m == 2.0


def _prunable_in_blocks(model: nn.Module) -> dict[str, nn.Linear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear) and ".layers." in n}


def _zeros(module: nn.Module) -> tuple[int, int]:
    w = module.weight.detach()
    return int((w == 0).sum()), w.numel()


@pytest.mark.parametrize("criterion", ["l1", "wanda", "sparsegpt"])
def test_pruning_with_the_rules_hits_each_block_and_the_target(criterion: str) -> None:
    model, data = tiny_llama(), batches()
    plant_outliers(model, 0)
    config = pk.UnstructuredConfig(sparsity=0.6, criterion=criterion, seed=3)
    alloc = owl_allocation(model, config, data)
    rules = alloc.rules()
    leaves = [v for v in rules.rules.values() if v is not None]
    assert all(leaf.criterion == criterion and leaf.scope == "layer" and leaf.seed == 3 for leaf in leaves)
    pk.prune(model, rules, data=data)
    pk.finalize(model)
    zeros = total = 0
    for block, sparsity in alloc.sparsities.items():
        counts = [_zeros(m) for n, m in _prunable_in_blocks(model).items() if n.startswith(block + ".")]
        z, t = sum(c[0] for c in counts), sum(c[1] for c in counts)
        assert z / t == pytest.approx(sparsity, abs=0.01), block  # per-row rounding of 64/128 inputs
        zeros, total = zeros + z, total + t
    assert zeros / total == pytest.approx(0.6, abs=0.005)
    assert alloc.sparsities["model.layers.0"] < 0.6
    assert _zeros(model.lm_head)[0] == 0  # the output head stays dense, as with the plain config


def test_excluded_layers_stay_dense_and_are_not_scored() -> None:
    model, data = tiny_llama(), batches()
    config = pk.UnstructuredConfig(sparsity=0.5, criterion="wanda", exclude=[r"re:.*\.o_proj"])
    lod = outlier_distribution(model, config, data)
    o_proj = model.model.layers[0].self_attn.o_proj.weight.numel()
    full = outlier_distribution(model, pk.UnstructuredConfig(sparsity=0.5), data)
    assert lod.params["model.layers.0"] == full.params["model.layers.0"] - o_proj
    rules = lod.allocate(config, 0.08).rules()
    assert rules.rules[r"re:.*\.o_proj"] is None
    pk.prune(model, rules, data=data)
    pk.finalize(model)
    for i in range(4):
        assert _zeros(model.model.layers[i].self_attn.o_proj)[0] == 0
        assert _zeros(model.model.layers[i].mlp.up_proj)[0] > 0


def test_the_rules_survive_a_recipe_round_trip(tmp_path) -> None:
    lod = OutlierDistribution({b: 0.01 * (i + 1) for i, b in enumerate(BLOCKS)}, dict.fromkeys(BLOCKS, 100), 5.0)
    rules = lod.allocate(pk.UnstructuredConfig(sparsity=0.6, criterion="sparsegpt", exclude=["lm_head"])).rules()
    pk.save_recipe(rules, tmp_path / "owl.yaml")
    assert pk.load_recipe(tmp_path / "owl.yaml") == rules
    assert rules.rules["lm_head"] is None and rules.rules[r"re:model\.layers\.3\..*"].sparsity == pytest.approx(0.52)


def test_measuring_does_not_mutate_the_model() -> None:
    model = tiny_llama().train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    owl(model, pk.UnstructuredConfig(sparsity=0.5, criterion="sparsegpt"), batches())
    assert model.training
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert not any(m._forward_hooks for m in model.modules())


# --------------------------------------------------------------------------------------------
# Bad input.


def test_a_model_without_repeated_blocks_is_refused() -> None:
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    with pytest.raises(ConfigError, match="no nn.ModuleList with two or more blocks"):
        owl(model, pk.UnstructuredConfig(sparsity=0.5), [torch.randn(2, 8)])


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"lam": 0.7}, r"OWL lam: 0.7 is out of range for sparsity 0.6"),
    ({"lam": -0.1}, r"OWL lam: -0.1"),
    ({"m": 0.0}, r"OWL m: 0.0 is not a positive"),
    ({"m": -5}, r"OWL m: -5"),
])
def test_bad_hyperparameters_are_refused_before_any_pass(kwargs: dict, match: str) -> None:
    model = tiny_llama()
    calls: list[int] = []
    model.register_forward_pre_hook(lambda *_: calls.append(1))
    with pytest.raises(ConfigError, match=match):
        owl(model, pk.UnstructuredConfig(sparsity=0.6), batches(), **kwargs)
    assert not calls


@pytest.mark.parametrize("data", [None, []])
def test_missing_data_is_a_calibration_error(data: list | None) -> None:
    with pytest.raises(CalibrationError, match="calibration data"):
        owl(tiny_llama(), pk.UnstructuredConfig(sparsity=0.5, criterion="l1"), data)


def test_a_config_without_a_free_sparsity_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"OWL allocates the sparsity of an UnstructuredConfig .*, got NMConfig"):
        owl(tiny_llama(), NMConfig(n=2, m=4), batches())
    with pytest.raises(ConfigError, match="got NMConfig"):
        OutlierDistribution({"a": 0.1}, {"a": 1}, 5.0).allocate(NMConfig(n=2, m=4))  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------------
# Two ranks, simulated in one process: each thread is a rank with its own batches, and the
# all_reduce the calibration statistics go through sums the ranks' tensors in call order.


class _ThreadGroup:
    def __init__(self, world: int) -> None:
        self.world, self.local = world, threading.local()
        self.barrier, self.slots = threading.Barrier(world), [torch.zeros(0)] * world

    def rank_and_world(self) -> tuple[int, int]:
        return self.local.rank, self.world

    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        self.slots[self.local.rank] = t.clone()
        self.barrier.wait()
        total = sum(self.slots[1:], self.slots[0].clone())
        self.barrier.wait()  # every rank has read the slots before any writes its next tensor
        return total

    def run(self, fn: Callable[[int], object]) -> list[object]:
        out: list[object] = [None] * self.world

        def worker(rank: int) -> None:
            self.local.rank = rank
            try:
                out[rank] = fn(rank)
            except BaseException as err:  # noqa: BLE001 - handed to the main thread
                out[rank] = err
                self.barrier.abort()

        threads = [threading.Thread(target=worker, args=(r,)) for r in range(self.world)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        return out


def test_ranks_sum_statistics_and_agree_with_one_process_that_saw_every_batch(monkeypatch) -> None:
    model = tiny_llama()
    plant_outliers(model, 1)
    config = pk.UnstructuredConfig(sparsity=0.6, criterion="wanda")
    per_rank = [batches(3, seed=0), batches(3, seed=1)]
    with torch.no_grad():  # rank 1's data has its own outlier token: rank 0 alone would miss it
        per_rank[1][0]["input_ids"][0, :16] = 7
    one_process = owl_allocation(model, config, per_rank[0] + per_rank[1])
    rank0_alone = owl_allocation(model, config, per_rank[0])
    group = _ThreadGroup(2)
    monkeypatch.setattr(calibration, "rank_and_world", group.rank_and_world)
    monkeypatch.setattr(calibration, "all_reduce_sum", group.all_reduce_sum)
    models = [copy.deepcopy(model), copy.deepcopy(model)]  # each rank hooks its own replica
    results = group.run(lambda rank: owl_allocation(models[rank], config, per_rank[rank]))
    for r in results:
        if isinstance(r, BaseException):
            raise r
    a, b = results
    assert a.sparsities == b.sparsities and a.distribution == b.distribution  # type: ignore[union-attr]
    for block in BLOCKS:
        assert a.distribution.ratios[block] == pytest.approx(one_process.distribution.ratios[block], abs=1e-4)
        assert a.sparsities[block] == pytest.approx(one_process.sparsities[block], abs=1e-3)
    assert any(abs(a.distribution.ratios[blk] - rank0_alone.distribution.ratios[blk]) > 1e-4 for blk in BLOCKS)
