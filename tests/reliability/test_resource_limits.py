"""Resource limits: `max_memory` makes calibration passes and sensitivity scans refuse up front.

A refused pass raises `MemoryBudgetError` with the estimate and the budget before any forward
pass or evaluation runs; a generous budget changes nothing about the result.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import prunekit as pk
from prunekit.allocation.sensitivity import sensitivity_estimate
from prunekit.core.memory import parse_memory
from prunekit.methods.calibration import calibration_estimate, get_solver


@pytest.mark.parametrize(
    ("value", "expected"),
    [(1024, 1024), ("4GB", 4 * 10**9), ("1.5GiB", int(1.5 * 2**30)), ("512 mb", 512 * 10**6), ("100", 100),
     ("64KiB", 65536), (None, None)],
)
def test_parse_memory(value: object, expected: int | None) -> None:
    assert parse_memory(value) == expected  # type: ignore[arg-type]


@pytest.mark.parametrize("value", ["lots", "-1GB", 0, -5, True, 1.5, "4 XB", "", "0GB", "GB"])
def test_bad_memory_sizes_name_the_field(value: object) -> None:
    with pytest.raises(pk.ConfigError, match=r"max_memory: .* (memory size|positive|more than 0)"):
        parse_memory(value)  # type: ignore[arg-type]


def test_malformed_budget_fails_even_for_a_method_without_calibration() -> None:
    with pytest.raises(pk.ConfigError, match="max_memory"):
        pk.plan(nn.Linear(4, 4), pk.UnstructuredConfig(sparsity=0.5), max_memory="a lot")


# --------------------------------------------------------------------------------------------
# Calibration passes (SparseGPT, Wanda).


def _mlp(width: int = 128) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(width, width), nn.ReLU(), nn.Linear(width, 8))


def _calls(model: nn.Module) -> list[str]:
    seen: list[str] = []
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            module.register_forward_pre_hook(lambda _m, _i, name=name: seen.append(name))
    return seen


def _cfg(criterion: str) -> pk.UnstructuredConfig:
    return pk.UnstructuredConfig(sparsity=0.5, criterion=criterion, scope="layer")


def test_estimate_counts_one_fp32_hessian_per_layer() -> None:
    model, batches = _mlp(), [torch.randn(64, 128)]
    gpt = calibration_estimate(model, ["0", "2"], batches, get_solver("sparsegpt"))
    assert gpt.parts["hessians"] == (128 * 128 + 128) * 4 * 2  # both layers' X^T X at once (no blocks)
    wanda = calibration_estimate(model, ["0", "2"], batches, get_solver("wanda"))
    assert wanda.parts["statistics"] == 128 * 4 * 2 and "hessians" not in wanda.parts
    assert gpt.parts["model"] == sum(p.numel() * 4 for p in model.parameters())
    assert gpt.parts["calibration batches"] == 64 * 128 * 4


@pytest.mark.parametrize("config", [
    _cfg("sparsegpt"), _cfg("wanda"), pk.UnstructuredConfig(sparsity=0.5, criterion="wanda", scope="global"),
    pk.BlockConfig(sparsity=0.5, block=(1, 8), criterion="wanda"),
    pk.BlockConfig(sparsity=0.5, block=(1, 8), criterion="wanda", scope="global"),
], ids=["sparsegpt", "wanda", "wanda-global", "block-wanda", "block-wanda-global"])
def test_calibration_over_budget_is_refused_before_any_forward(config: pk.UnstructuredConfig) -> None:
    model, batches = _mlp(), [torch.randn(64, 128)]
    seen = _calls(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(pk.MemoryBudgetError, match=r"about [\d.]+ [kMG]?B \(model .*exceeds max_memory 100 kB"):
        pk.prune(model, config, data=batches, max_memory="100kB")
    assert seen == [], "the pass started before refusing"
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_budget_boundary_is_the_estimate_and_a_generous_budget_changes_nothing() -> None:
    batches = [torch.randn(64, 128)]
    estimate = calibration_estimate(_mlp(), ["0", "2"], batches, get_solver("sparsegpt")).total
    with pytest.raises(pk.MemoryBudgetError, match=f"{estimate - 1:,} bytes"):
        pk.plan(_mlp(), _cfg("sparsegpt"), data=batches, max_memory=estimate - 1)
    at_budget = pk.plan(_mlp(), _cfg("sparsegpt"), data=batches, max_memory=estimate)
    generous = pk.plan(_mlp(), _cfg("sparsegpt"), data=batches, max_memory="4GB")
    free = pk.plan(_mlp(), _cfg("sparsegpt"), data=batches)
    for key in free.masks:
        assert torch.equal(generous.masks[key], free.masks[key]) and torch.equal(at_budget.masks[key], free.masks[key])
        torch.testing.assert_close(generous.weights[key], free.weights[key], rtol=0, atol=0)


def test_a_40gb_hessian_is_refused_in_an_instant() -> None:
    """A 400 kB model whose one layer has 100k inputs: SparseGPT's Hessian alone is 40 GB.
    Without a budget the pass would try to allocate it; with one it refuses before allocating."""
    model = nn.Sequential(nn.Linear(100_000, 1))
    with pytest.raises(pk.MemoryBudgetError, match=r"hessians 40 GB, solver scratch 320 GB.*max_memory 8 GB"):
        pk.prune(model, _cfg("sparsegpt"), data=[torch.randn(2, 100_000)], max_memory="8GB")


class _Blocks(nn.Module):
    """An LLM-shaped stack: embedding, repeated blocks in a ModuleList, head."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(50, 32)
        self.layers = nn.ModuleList(nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 32)) for _ in range(3))
        self.head = nn.Linear(32, 50)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.embed(ids)
        for block in self.layers:
            h = h + block(h)
        return self.head(h)


def test_block_model_counts_one_block_of_hessians_and_the_captured_activations() -> None:
    model, batches = _Blocks(), [torch.randint(0, 50, (2, 16)) for _ in range(4)]
    fqns = [f"layers.{i}.{j}" for i in range(3) for j in (0, 2)]
    blocks = [f"layers.{i}" for i in range(3)]
    hidden = 2 * 16 * 32 * 4  # one batch's input to block 0, fp32
    estimate = calibration_estimate(model, fqns, batches, get_solver("sparsegpt"), hidden, blocks)
    assert estimate.parts["hessians"] == (32 * 32 + 32 + 64 * 64 + 64) * 4  # one block, not three
    assert estimate.parts["block activations"] == 2 * hidden * 4
    seen = _calls(model)
    with pytest.raises(pk.MemoryBudgetError, match="block activations"):
        pk.prune(model, pk.PerLayer({"re:layers\\..*": _cfg("sparsegpt")}), data=batches,
                 max_memory=estimate.total - 1)
    assert not any(s.startswith("layers.") for s in seen), "a block ran before the refusal"
    pk.prune(model, pk.PerLayer({"re:layers\\..*": _cfg("sparsegpt")}), data=batches, max_memory=estimate.total)
    assert pk.sparsity(model).layers["layers.1.0"] == pytest.approx(0.5)


# --------------------------------------------------------------------------------------------
# Sensitivity scans.


def test_sensitivity_over_budget_is_refused_before_the_first_evaluation() -> None:
    calls: list[int] = []
    model = _mlp()
    with pytest.raises(pk.MemoryBudgetError, match=r"sensitivity scan of 2 layers.*exceeds max_memory 10 kB"):
        pk.sensitivity(model, pk.UnstructuredConfig(sparsity=0.5), lambda m: calls.append(1) or 1.0,
                       levels=[0.5], max_memory="10kB")
    assert calls == []


def test_sensitivity_estimate_counts_calibration_and_model_copies() -> None:
    model = _mlp()
    plain = sensitivity_estimate(model, pk.UnstructuredConfig(sparsity=0.5))
    gpt = sensitivity_estimate(model, _cfg("sparsegpt"), data=[torch.randn(8, 128)])
    assert gpt.total - plain.total >= 9 * 128 * 128 * 4  # a Hessian and its factors, fp32
    channels = sensitivity_estimate(model, pk.ChannelConfig(ratio=0.5))
    assert channels.parts["pruned copy per probe"] == channels.parts["model"]


def test_sensitivity_under_a_generous_budget_gives_the_same_table() -> None:
    x, y = torch.randn(32, 128), torch.randint(0, 8, (32,))
    evaluate = pk.proxy_loss([(x, y)], n_batches=1)
    free = pk.sensitivity(_mlp(), pk.UnstructuredConfig(sparsity=0.5), evaluate, levels=[0.5, 0.9],
                          higher_is_better=False)
    capped = pk.sensitivity(_mlp(), pk.UnstructuredConfig(sparsity=0.5), evaluate, levels=[0.5, 0.9],
                            higher_is_better=False, max_memory=2**30)
    assert capped.values == free.values


_MEASURE = """
import resource, sys, torch
from torch import nn
import prunekit as pk
from prunekit.methods.calibration import get_solver
from prunekit.methods.calibration import calibration_estimate
criterion, d = sys.argv[1], 3072
cfg = pk.UnstructuredConfig(sparsity=0.5, criterion=criterion, scope="layer")
pk.plan(nn.Sequential(nn.Linear(64, 4)), cfg, data=[torch.randn(64, 64)])  # warm up allocators, kernels
model, data = nn.Sequential(nn.Linear(d, 16)), [torch.randn(64, d)]
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
pk.plan(model, cfg, data=data)
grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before
est = calibration_estimate(model, ["0"], data, get_solver(criterion))
print(grown, est.total - est.parts["model"] - est.parts["calibration batches"])
"""


@pytest.mark.slow
@pytest.mark.parametrize("criterion", ["sparsegpt", "wanda"])
def test_estimate_covers_the_measured_peak(criterion: str) -> None:
    """Peak RSS growth of a real pass (fresh interpreter) stays within the estimate's working set."""
    import os
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", _MEASURE, criterion], capture_output=True, text=True, check=True,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    grown, working = (int(v) for v in out.stdout.split())
    assert grown <= working * 1.1 + 2**20, f"measured {grown:,} B, estimated {working:,} B"
    if criterion == "sparsegpt":  # the d x d terms dominate: the estimate is also not wildly high
        assert grown >= working * 0.5, f"measured {grown:,} B, estimated {working:,} B"
