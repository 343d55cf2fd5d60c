"""Bad input gives clear errors naming the layer or op, and never a half-pruned model."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

import prunekit
from tests.models import ResidualCNN


class DataDependent(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 8)
        self.gate = Gate()
        self.out = nn.Linear(8, 2)

    def forward(self, x: Tensor) -> Tensor:
        return self.out(self.gate(self.fc(x)))


class Gate(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        if x.sum() > 0:  # data-dependent control flow
            return x
        return -x


class Flipped(nn.Module):
    """conv -> flip over channels (no op rule) -> conv, plus a plain Linear branch to prune."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 8, 1)
        self.b = nn.Conv2d(8, 4, 1)
        self.fc1 = nn.Linear(4, 16)
        self.fc2 = nn.Linear(16, 2)

    def forward(self, x: Tensor) -> Tensor:
        y = self.b(torch.flip(self.a(x), [1])).mean(dim=(2, 3))
        return self.fc2(torch.relu(self.fc1(y)))


def test_ratio_one_is_rejected() -> None:
    with pytest.raises(prunekit.ConfigError, match="ratio"):
        prunekit.ChannelConfig(ratio=1.0)
    with pytest.raises(prunekit.ConfigError, match="criterion"):
        prunekit.ChannelConfig(ratio=0.5, criterion="bogus")
    with pytest.raises(prunekit.ConfigError, match="ratoi"):
        prunekit.ChannelConfig(ratoi=0.5)


def test_exclude_must_match_a_layer() -> None:
    model = ResidualCNN().eval()
    with pytest.raises(prunekit.ConfigError, match="'nope'"):
        prunekit.plan(model, prunekit.ChannelConfig(ratio=0.5, exclude=["nope"]), torch.randn(1, 1, 8, 8))


def test_exclude_keeps_layer_outputs() -> None:
    model = ResidualCNN().eval()
    plan = prunekit.plan(model, prunekit.ChannelConfig(ratio=0.5, exclude=["conv1"]), torch.randn(1, 1, 8, 8))
    assert "conv1.weight" not in plan.keep or 0 not in plan.keep["conv1.weight"]
    assert 0 in plan.keep["stem.0.weight"]


def test_untraceable_model_names_the_module() -> None:
    model = DataDependent()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(prunekit.TraceError, match="'gate'"):
        prunekit.prune(model, prunekit.ChannelConfig(ratio=0.5), example_inputs=torch.randn(2, 4))
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())


def test_missing_example_inputs() -> None:
    with pytest.raises(prunekit.TraceError, match="example_inputs"):
        prunekit.plan(ResidualCNN(), prunekit.ChannelConfig(ratio=0.5))


def test_unknown_op_is_a_barrier_with_one_warning() -> None:
    model = Flipped().eval()
    x = torch.randn(2, 3, 4, 4)
    with pytest.warns(UserWarning, match=r"aten\.flip.*'<root>'") as record:
        plan = prunekit.plan(model, prunekit.ChannelConfig(ratio=0.5), x)
    assert len([w for w in record if "barrier" in str(w.message)]) == 1
    assert "a.weight" not in plan.keep  # nothing pruned across the flip
    assert 0 in plan.keep["fc1.weight"]  # the rest still prunes


def test_global_ratio_that_empties_a_group_names_it() -> None:
    import numpy as np

    from prunekit.structured.groups import Group
    from prunekit.structured.select import select_units

    groups = [
        Group([("a.weight", 0)], {("a.weight", 0): [np.array([i]) for i in range(2)]}, ["a"]),
        Group([("b.weight", 0)], {("b.weight", 0): [np.array([i]) for i in range(8)]}, ["b"]),
    ]
    scores = [np.array([1.0, 1.0]), np.array([0.1] * 7 + [10.0])]
    with pytest.raises(prunekit.PlanError, match="layer 'a': global ratio 0.95 would remove all 2"):
        select_units(groups, scores, 0.95, "global", 1)
    assert [len(r) for r in select_units(groups, scores, 0.5, "global", 1)] == [0, 5]


def test_masked_model_must_be_finalized_first() -> None:
    model = ResidualCNN().eval()
    prunekit.prune(model, prunekit.UnstructuredConfig(sparsity=0.5))
    with pytest.raises(prunekit.ConfigError, match="finalize"):
        prunekit.plan(model, prunekit.ChannelConfig(ratio=0.5), torch.randn(1, 1, 8, 8))


def test_model_with_nothing_to_prune_is_a_clear_error() -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    # The only hidden layer is excluded and the output layer can never shrink: nothing is left.
    with pytest.raises(prunekit.UnsupportedLayerError, match="no prunable channel group"):
        prunekit.plan(model, prunekit.ChannelConfig(ratio=0.5, exclude=["0"]), torch.randn(1, 4))
