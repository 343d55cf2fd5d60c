"""Low-rank factorization (issue 18 item 2): SVD pairs replace Linear/Conv2d layers, as a plan.

Pinned: the pair reproduces the layer at full rank; the weight error falls with the rank as
Eckart-Young says; the energy rule picks the right rank on a matrix built with known singular
values; `plan` never mutates and `apply` is all or nothing; the plan round-trips through JSON
and through `prunekit.save`/`load`; the factorized model exports to ONNX and passes the check;
bad input names the field or layer; the family's level drives `allocate` to a FLOPs target.
"""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import prunekit as pk
from prunekit.allocation.sensitivity.table import SensitivityTable
from prunekit.config import config_to_dict
from prunekit.structured.factorize import FactorizedLayer, energy_rank, factorize, weight_matrix
from prunekit.structured.lowrank import FORMAT, LowRankConfig, LowRankPlan
from tests.models import DepthwiseCNN, ResidualCNN, TinyAttention


class Net(nn.Module):
    """Conv (stride, padding, bias) -> Conv without bias -> pooled Linear stack."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 24, 3, stride=2, padding=1)
        self.conv2 = nn.Conv2d(24, 32, 3, padding=1, bias=False)
        self.fc1 = nn.Linear(32, 48)
        self.fc2 = nn.Linear(48, 5)

    def forward(self, x: Tensor) -> Tensor:
        x = torch.relu(self.conv2(torch.relu(self.conv1(x))))
        return self.fc2(torch.relu(self.fc1(x.mean(dim=(2, 3)))))


class SamePadConv(nn.Conv2d):
    """A Conv2d subclass with its own forward (EfficientNet's static 'same' padding)."""

    def forward(self, x: Tensor) -> Tensor:
        return F.conv2d(F.pad(x, (0, 2, 1, 1)), self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


@pytest.fixture(autouse=True)
def _one_thread() -> Any:
    # Tiny SVDs and forwards are too small to split; on a shared CPU a second thread only waits.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _net() -> tuple[nn.Module, Tensor]:
    torch.manual_seed(0)
    return Net().eval(), torch.randn(2, 3, 12, 12)


def _state(model: nn.Module) -> dict[str, Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def _same(a: dict[str, Tensor], b: dict[str, Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# --------------------------------------------------------------------------------------------
# The math.


@pytest.mark.parametrize("layer", [
    nn.Linear(12, 7),
    nn.Conv2d(4, 6, 3, stride=2, padding=1, dilation=1),
    nn.Conv2d(5, 8, (3, 1), padding=(1, 0), bias=False, padding_mode="reflect"),
    SamePadConv(3, 5, 3, stride=2),
], ids=["linear", "conv", "conv-reflect-nobias", "conv-subclass"])
def test_full_rank_reproduces_the_layer(layer: nn.Module) -> None:
    torch.manual_seed(1)
    x = torch.randn(2, 12) if isinstance(layer, nn.Linear) else torch.randn(2, layer.in_channels, 9, 9)
    full = min(weight_matrix(layer).shape)
    pair = factorize(layer, full)
    assert isinstance(pair, FactorizedLayer) and pair.rank == full
    assert type(pair.down) is type(layer)  # the subclass's forward (its padding) still runs
    torch.testing.assert_close(pair(x), layer(x), atol=1e-5, rtol=1e-5)
    assert pair.down.bias is None and (pair.up.bias is None) == (layer.bias is None)


def test_error_decreases_with_rank_as_eckart_young_says() -> None:
    torch.manual_seed(2)
    layer = nn.Conv2d(6, 10, 3)
    w = weight_matrix(layer).detach().double()
    sigma = torch.linalg.svdvals(w)
    errors = []
    for r in range(1, min(w.shape) + 1):
        pair = factorize(layer, r)
        approx = (weight_matrix(pair.up).double() @ weight_matrix(pair.down).double()).detach()
        errors.append(float(torch.linalg.norm(w - approx)))
        assert errors[-1] == pytest.approx(float(sigma[r:].pow(2).sum().sqrt()), abs=1e-5)
    assert all(a > b for a, b in zip(errors, errors[1:], strict=False)) and errors[-1] < 1e-5
    # sqrt(S) on both sides: the two factors have equal scale
    pair = factorize(layer, 4)
    norms = [float(torch.linalg.norm(p.weight.detach())) for p in (pair.up, pair.down)]
    assert norms[0] == pytest.approx(norms[1], rel=1e-4)


def _with_singular_values(sigma: list[float], n: int = 16) -> nn.Linear:
    torch.manual_seed(3)
    u, _ = torch.linalg.qr(torch.randn(n, n))
    v, _ = torch.linalg.qr(torch.randn(n, n))
    s = torch.zeros(n)
    s[: len(sigma)] = torch.tensor(sigma)
    layer = nn.Linear(n, n, bias=False)
    with torch.no_grad():
        layer.weight.copy_(u @ torch.diag(s) @ v.T)
    return layer


@pytest.mark.parametrize(("energy", "rank"), [(0.5, 1), (16 / 30, 1), (0.8, 2), (25 / 30, 2), (0.85, 3), (1.0, 4)])
def test_energy_picks_the_smallest_rank_keeping_that_energy(energy: float, rank: int) -> None:
    # sigma^2 = 16, 9, 4, 1 (sum 30): cumulative energy 0.533, 0.833, 0.967, 1.0
    layer = _with_singular_values([4.0, 3.0, 2.0, 1.0])
    assert energy_rank(torch.tensor([4.0, 3.0, 2.0, 1.0]), energy) == rank
    plan = pk.plan(nn.Sequential(layer), LowRankConfig(energy=energy), torch.randn(2, 16))
    (entry,) = plan.layers
    assert entry.rank == rank and entry.energy_kept == pytest.approx([16, 25, 29, 30][rank - 1] / 30, abs=1e-6)


# --------------------------------------------------------------------------------------------
# Plans.


def test_plan_does_not_mutate_and_summarises() -> None:
    model, x = _net()
    before, modules = _state(model), dict(model.named_modules())
    plan = pk.plan(model, LowRankConfig(rank_ratio=0.25), x)
    assert _same(before, _state(model)) and dict(model.named_modules()) == modules
    # floor(0.25 * min(out, in)): conv1 24 x 27, conv2 32 x 216, fc1 48 x 32, fc2 5 x 48
    assert [(e.fqn, e.rank) for e in plan.layers] == [("conv1", 6), ("conv2", 8), ("fc1", 8), ("fc2", 1)]
    text = plan.summary()
    for needle in ("conv1", "6/24", "1/5", "params", "FLOPs", f"{plan.stats['flops_before']:,}"):
        assert needle in text
    out = plan.apply(copy.deepcopy(model))(x)
    assert out.shape == model(x).shape
    factorized = plan.apply(copy.deepcopy(model))
    assert pk.count_params(factorized) == plan.stats["params_after"] < plan.stats["params_before"]
    assert pk.count_flops(factorized, x) == plan.stats["flops_after"]
    assert sum(e.flops[0] - e.flops[1] for e in plan.layers) == plan.stats["flops_before"] - plan.stats["flops_after"]


def test_layers_whose_pair_is_not_smaller_stay_dense() -> None:
    model = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 64))
    plan = pk.plan(model, LowRankConfig(rank=9), torch.randn(2, 16))
    # 9 * (16 + 16) = 288 >= 256 stays dense; 9 * (16 + 64) = 720 < 1024 is factorized
    assert [e.fqn for e in plan.layers] == ["2"]
    assert "288 weights >= 256" in plan.skipped["0"] and "left dense 0" in plan.summary()


def test_per_layer_rules_and_rounding() -> None:
    model, x = _net()
    rules = pk.PerLayer({"fc1": LowRankConfig(rank=3, round_to=4), "conv2": None,
                         "_default": LowRankConfig(energy=0.5)})
    plan = pk.plan(model, rules, x)
    ranks = {e.fqn: (e.rank, e.rule) for e in plan.layers}
    assert ranks["fc1"] == (4, "rank 3") and "conv2" not in ranks and ranks["conv1"][1] == "energy 0.5"
    with pytest.raises(pk.ConfigError, match="mix"):
        pk.plan(model, pk.PerLayer({"fc1": LowRankConfig(rank=3), "_default": pk.UnstructuredConfig(sparsity=0.5)}), x)


def test_attention_and_grouped_convs_are_left_dense_with_reasons() -> None:
    torch.manual_seed(0)
    model, x = TinyAttention().eval(), torch.randn(2, 5, 32)
    plan = pk.plan(model, LowRankConfig(reduction=0.5), x)
    assert "reads its weight directly" in plan.skipped["attn.out_proj"]
    torch.testing.assert_close(plan.apply(copy.deepcopy(model))(x).shape, model(x).shape)
    plan = pk.plan(DepthwiseCNN().eval(), LowRankConfig(reduction=0.5), torch.randn(2, 3, 8, 8))
    assert "groups=16" in plan.skipped["dw"] and "groups=4" in plan.skipped["grouped"]


def test_hugging_face_bert_factorizes_and_runs() -> None:
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=64)
    model = transformers.BertModel(config).eval()
    inputs = {"input_ids": torch.randint(0, 64, (2, 7)), "attention_mask": torch.ones(2, 7, dtype=torch.long)}
    plan = pk.plan(model, LowRankConfig(reduction=0.5), inputs)
    assert len(plan.layers) == 2 * 6 + 1  # q, k, v, attention output, FFN in, FFN out per layer; pooler
    factorized = plan.apply(copy.deepcopy(model))
    assert factorized(**inputs).last_hidden_state.shape == (2, 7, 32)
    assert plan.stats["flops_after"] < 0.6 * plan.stats["flops_before"]


# --------------------------------------------------------------------------------------------
# Apply: all or nothing.


def test_apply_is_all_or_nothing_when_a_layer_does_not_fit() -> None:
    model, x = _net()
    plan = pk.plan(model, LowRankConfig(rank_ratio=0.25), x)
    doc = plan.to_dict()
    doc["layers"].append({**doc["layers"][0], "fqn": "no.such.layer"})
    before, children = _state(model), dict(model.named_children())
    with pytest.raises(pk.PlanError, match="no.such.layer"):
        LowRankPlan.from_dict(json.loads(json.dumps(doc))).apply(model)
    assert _same(before, _state(model)) and dict(model.named_children()) == children
    plan.apply(model)
    with pytest.raises(pk.PlanError, match="already factorized"):
        plan.apply(model)


class _FlakyChildren(dict):
    """A module's child table that refuses one name: the swap fails after earlier layers were swapped."""

    def __setitem__(self, key: str, value: Any) -> None:
        if key == "fc1" and isinstance(value, FactorizedLayer):
            raise RuntimeError("disk on fire")
        super().__setitem__(key, value)


def test_apply_rolls_back_a_failure_while_swapping() -> None:
    model, x = _net()
    plan = pk.plan(model, LowRankConfig(rank_ratio=0.25), x)
    expected, children = model(x), dict(model.named_children())
    model._modules = _FlakyChildren(model._modules)
    with pytest.raises(pk.PlanError, match="rolled back.*disk on fire"):
        plan.apply(model)
    assert dict(model.named_children()) == children  # conv1 and conv2 were swapped, then put back
    torch.testing.assert_close(model(x), expected)


def test_apply_refuses_a_corrupt_layer_before_swapping_any() -> None:
    model, x = _net()
    plan = pk.plan(model, LowRankConfig(rank_ratio=0.25), x)
    with torch.no_grad():
        model.fc2.weight[0, 0] = math.inf
    children = dict(model.named_children())
    with pytest.raises(pk.PlanError, match="'fc2'.*NaN/Inf"):
        plan.apply(model)
    assert dict(model.named_children()) == children


# --------------------------------------------------------------------------------------------
# Files: plan JSON, checkpoints, ONNX, recipes.


def test_plan_json_round_trip_replays(tmp_path: Path) -> None:
    model, x = _net()
    plan = pk.plan(model, LowRankConfig(energy=0.6, round_to=2), x)
    loaded = LowRankPlan.load(plan.save(tmp_path / "plan.json"))
    assert loaded.to_dict() == plan.to_dict() and loaded.config == plan.config
    torch.testing.assert_close(loaded.apply(copy.deepcopy(model))(x), plan.apply(copy.deepcopy(model))(x))
    bad = plan.to_dict()
    bad["layers"][0]["rank"] = 24  # conv1 is 24 x 27: rank 24 cannot shrink it
    with pytest.raises(pk.PlanError, match="rank 24"):
        LowRankPlan.from_dict(bad)


def test_save_load_rebuilds_the_factorized_model(tmp_path: Path) -> None:
    model, x = _net()
    plan = pk.plan(model, LowRankConfig(rank_ratio=0.25), x)
    factorized = plan.apply(model)
    pk.save(factorized, tmp_path / "m.safetensors", plan=plan)
    raw = (tmp_path / "m.safetensors").read_bytes()
    assert FORMAT.encode() in raw and b"conv1.down.weight" in raw
    reloaded = pk.load(tmp_path / "m.safetensors", Net)
    assert isinstance(reloaded.conv1, FactorizedLayer) and reloaded.conv1.rank == 6
    torch.testing.assert_close(reloaded.eval()(x), factorized(x))


def test_onnx_export_passes_its_check(tmp_path: Path) -> None:
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    torch.manual_seed(0)
    model, x = ResidualCNN().eval(), torch.randn(2, 1, 12, 12)
    factorized = pk.plan(model, LowRankConfig(energy=0.8), x).apply(copy.deepcopy(model))
    report = pk.export_onnx(factorized, tmp_path / "m.onnx", x)
    assert report.checked and report.max_abs_diff is not None and report.max_abs_diff < 1e-4


def test_recipe_round_trip(tmp_path: Path) -> None:
    cfg = LowRankConfig(energy=0.9, round_to=8, exclude=["head"])
    pk.save_recipe(cfg, tmp_path / "r.yaml")
    assert pk.load_recipe(tmp_path / "r.yaml") == cfg


# --------------------------------------------------------------------------------------------
# Bad input.


@pytest.mark.parametrize(("kwargs", "field"), [
    ({"rank": 0}, "rank"), ({"energy": 0.0}, "energy"), ({"energy": 1.5}, "energy"), ({"energy": -0.1}, "energy"),
    ({"rank_ratio": 1.0}, "rank_ratio"), ({"reduction": 1.0}, "reduction"), ({}, "none"),
    ({"rank": 4, "energy": 0.9}, "'energy', 'rank'"), ({"energy": 0.9, "ranks": 3}, "ranks"),
])
def test_bad_configs_name_the_field(kwargs: dict[str, Any], field: str) -> None:
    with pytest.raises(pk.ConfigError, match=field) as err:
        LowRankConfig(**kwargs)
    assert "LowRankConfig" in str(err.value)


def test_rank_too_high_names_the_layer_and_value() -> None:
    model, x = _net()
    with pytest.raises(pk.ConfigError, match=r"layer 'fc2': LowRankConfig.rank=8 >= min\(out 5, in 48\) = 5"):
        pk.plan(model, LowRankConfig(rank=8), x)


def test_unsupported_layers_are_named() -> None:
    model = nn.Sequential(nn.Conv1d(4, 8, 3), nn.ReLU(), nn.Conv1d(8, 8, 3))
    with pytest.raises(pk.UnsupportedLayerError, match="Conv1d is not supported"):
        pk.plan(model, LowRankConfig(energy=0.9), torch.randn(1, 4, 16))


def test_masked_and_corrupt_layers_are_refused() -> None:
    model, x = _net()
    masked = pk.prune(copy.deepcopy(model), pk.PerLayer({"fc1": pk.UnstructuredConfig(sparsity=0.5)}))
    with pytest.raises(pk.ConfigError, match="'fc1' has a mask.*finalize"):
        pk.plan(masked, LowRankConfig(energy=0.9), x)
    with torch.no_grad():
        model.fc1.weight[0, 0] = math.nan
    with pytest.raises(pk.PlanError, match="'fc1'.*NaN"):
        pk.plan(model, LowRankConfig(energy=0.9), x)


# --------------------------------------------------------------------------------------------
# The family's level: sensitivity-style probes, then `allocate` to a FLOPs target.


def _probe_table(model: nn.Module, family: LowRankConfig, x: Tensor, levels: list[float]) -> SensitivityTable:
    """What a sensitivity scan of this family measures: each layer alone at each level, on a copy."""
    units = [e.fqn for e in pk.plan(model, family.with_level(levels[-1]), x).layers]
    reference, p0, f0 = model(x).detach(), pk.count_params(model), pk.count_flops(model, x)
    values: dict[str, list[float]] = {u: [] for u in units}
    removed: dict[str, dict[str, list[int]]] = {"params": {u: [] for u in units}, "flops": {u: [] for u in units}}
    for unit in units:
        for level in levels:
            probe = pk.plan(model, pk.PerLayer({unit: family.with_level(level).as_layer_rule()}))  # no self-check
            pruned = probe.apply(copy.deepcopy(model))
            values[unit].append(float(F.mse_loss(pruned(x), reference).detach()))
            removed["params"][unit].append(p0 - pk.count_params(pruned))
            removed["flops"][unit].append(f0 - pk.count_flops(pruned, x))
    params = {u: dict(model.named_modules())[u].weight.numel() for u in units}
    return SensitivityTable(units, levels, values, 0.0, False, config_to_dict(family), params, None, p0, f0, {},
                            "layer", removed)


def test_level_is_the_reduction_and_allocate_meets_a_flops_target() -> None:
    model, x = _net()
    family = LowRankConfig(energy=0.9, exclude=["fc2"])
    rule = family.with_level(0.6)
    assert (rule.reduction, rule.energy, rule.exclude) == (0.6, None, ("fc2",)) and rule.as_layer_rule().exclude == ()
    with pytest.raises(pk.ConfigError, match="reduction"):
        family.with_level(1.0)
    table = _probe_table(model, family, x, [0.25, 0.5, 0.75])
    allocation = pk.allocate(table, pk.FlopsTarget(reduction=0.4))
    plan = pk.plan(model, allocation.to_config(family), x)
    achieved = 1 - plan.stats["flops_after"] / plan.stats["flops_before"]
    assert achieved == pytest.approx(0.4, abs=0.03)
    pruned = allocation.apply(copy.deepcopy(model), x)  # the layer path: prunekit.prune with the rules
    assert pk.count_flops(pruned, x) == plan.stats["flops_after"]


def test_sensitivity_and_allocate_choose_ranks_for_a_flops_target() -> None:
    """Each layer is factorized alone at each level on a copy; allocate picks per-layer reductions
    that meet the FLOPs target, and the plan built from them measures that reduction."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10)).eval()
    with torch.no_grad():  # layer 2 is nearly rank 8: cheap to factorize, so allocation should favour it
        model[2].weight.copy_(torch.randn(64, 8) @ torch.randn(8, 64) / 8 + 1e-3 * torch.randn(64, 64))
    x = torch.randn(128, 32)
    reference = model(x).detach()

    @torch.no_grad()
    def mse(m: nn.Module) -> float:
        return float((m(x) - reference).pow(2).mean())

    family = pk.LowRankConfig(reduction=0.3, exclude=["4"])
    before = copy.deepcopy(model.state_dict())
    table = pk.sensitivity(model, family, mse, [0.2, 0.5, 0.8], higher_is_better=False, example_inputs=x[:1])
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())  # probes ran on copies
    assert table.units == ["0", "2"] and table.values["2"][1] < table.values["0"][1]
    rules = pk.allocate(table, pk.FlopsTarget(reduction=0.3)).to_config(family)
    pruned = pk.plan(model, rules, x[:1]).apply(copy.deepcopy(model))
    saved = 1 - pk.count_flops(pruned, x[:1]) / pk.count_flops(model, x[:1])
    assert saved == pytest.approx(0.3, abs=0.05)
    assert rules.rules["2"] is not None and (rules.rules["0"] is None or rules.rules["0"].reduction
                                             < rules.rules["2"].reduction)
