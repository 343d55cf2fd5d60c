"""Graph patterns users bring (issue 18): each prunes consistently or is a named barrier.

Consistent: the pruned model computes what the dense model computes with the removed
channels zeroed (`assert_equivalent`). Refused: a warning names the op, its source line and
why, the rest of the model still prunes, and no "please report it" self-check failure.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Iterator
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import prunekit
from prunekit._registry import Registry
from prunekit.structured import ChannelPlan, layers, register_layer_handler
from prunekit.structured.layers import LayerHandler
from tests.structured.helpers import assert_equivalent, run, zeroed_copy


def _plan(model: nn.Module, x: object, ratio: float = 0.3) -> tuple[ChannelPlan, list[str]]:
    """Plan at `ratio`, returning the plan and the barrier warnings it raised."""
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        plan = prunekit.plan(model.eval(), prunekit.ChannelConfig(ratio=ratio), x)
    return plan, [str(w.message) for w in record if "barrier" in str(w.message)]


def _removed(plan: ChannelPlan) -> int:
    return plan.stats["params_before"] - plan.stats["params_after"]


# --------------------------------------------------------------------------------------------
# 1. Splits.


class SplitBranches(nn.Module):
    """conv -> split in two on channels -> a conv per half -> cat -> conv."""

    def __init__(self, how: str) -> None:
        super().__init__()
        self.how = how
        self.stem = nn.Conv2d(3, 64, 3, padding=1)
        self.a, self.b = nn.Conv2d(32, 16, 1), nn.Conv2d(32, 16, 1)
        self.head = nn.Conv2d(32, 4, 1)

    def forward(self, x: Tensor) -> Tensor:
        y = torch.relu(self.stem(x))
        if self.how == "literal":
            p, q = torch.split(y, 32, dim=1)
        elif self.how == "literal_list":
            p, q = y.split([32, 32], dim=1)
        elif self.how == "chunk":
            p, q = y.chunk(2, dim=1)
        else:  # computed from the shape: follows the pruned width
            p, q = torch.split(y, y.shape[1] // 2, dim=1)
        return self.head(torch.cat([self.a(p), self.b(q)], 1)).mean((2, 3))


@pytest.mark.parametrize("how", ["literal", "literal_list"])
def test_literal_split_is_a_named_barrier(how: str) -> None:
    torch.manual_seed(0)
    model, x = SplitBranches(how), torch.randn(2, 3, 8, 8)
    plan, barriers = _plan(model, x)
    assert len(barriers) == 1 and "split" in barriers[0] and "test_graph_patterns.py:" in barriers[0], barriers
    assert "numbers in the source" in barriers[0] and "chunk" in barriers[0]  # why, and the fix
    assert "stem.weight" not in plan.keep  # the split dim keeps its width
    assert 0 in plan.keep["a.weight"] and 0 in plan.keep["b.weight"]  # the rest still prunes
    assert_equivalent(model, plan, x)


@pytest.mark.parametrize("how", ["chunk", "computed"])
def test_chunk_and_computed_split_sizes_prune_the_halves_together(how: str) -> None:
    torch.manual_seed(0)
    model, x = SplitBranches(how), torch.randn(2, 3, 8, 8)
    plan, barriers = _plan(model, x)
    assert not barriers
    kept = plan.keep["stem.weight"][0]
    assert len(kept) == 46 and [k for k in kept if k >= 32] == [k + 32 for k in kept if k < 32]  # same positions
    assert_equivalent(model, plan, x)
    assert _removed(plan) == 2980 - 1964


class LiteralFlatten(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.fc1, self.fc2 = nn.Conv2d(3, 8, 1), nn.Linear(8 * 16, 32), nn.Linear(32, 3)

    def forward(self, x: Tensor) -> Tensor:
        y = torch.relu(self.conv(x)).view(x.shape[0], 128)  # 128 = 8 channels * 4 * 4, a number
        return self.fc2(torch.relu(self.fc1(y)))


def test_view_with_literal_sizes_found_by_the_self_check_is_a_named_barrier() -> None:
    torch.manual_seed(0)
    model, x = LiteralFlatten(), torch.randn(2, 3, 4, 4)
    plan, barriers = _plan(model, x)
    assert len(barriers) == 1 and "view at test_graph_patterns.py:" in barriers[0], barriers
    assert "[2, 128]" in barriers[0] and "failed to run" in barriers[0]
    assert "conv.weight" not in plan.keep and 0 in plan.keep["fc1.weight"]
    assert_equivalent(model, plan, x)


# --------------------------------------------------------------------------------------------
# 2. Channel shuffle (ShuffleNetV2).


def channel_shuffle(x: Tensor, groups: int) -> Tensor:
    b, c, h, w = x.size()
    return x.view(b, groups, c // groups, h, w).transpose(1, 2).reshape(b, c, h, w)


class ShuffleUnit(nn.Module):
    """ShuffleNetV2's stride-1 unit: split, one branch convolved, concatenate, shuffle."""

    def __init__(self, literal: bool = False) -> None:
        super().__init__()
        self.literal = literal
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        depthwise = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.branch = nn.Sequential(nn.Conv2d(8, 8, 1), nn.BatchNorm2d(8), nn.ReLU(), depthwise, nn.Conv2d(8, 8, 1))
        self.conv, self.fc = nn.Conv2d(16, 24, 1), nn.Linear(24, 5)

    def forward(self, x: Tensor) -> Tensor:
        left, right = torch.relu(self.stem(x)).chunk(2, dim=1)
        y = torch.cat([left, torch.relu(self.branch(right))], 1)
        if self.literal:
            y = y.view(y.shape[0], 2, 8, 8, 8).transpose(1, 2).reshape(y.shape[0], -1, 8, 8)
        else:
            y = channel_shuffle(y, 2)
        return self.fc(torch.relu(self.conv(y)).mean((2, 3)))


def test_channel_shuffle_prunes_whole_shuffle_columns() -> None:
    torch.manual_seed(0)
    for m in (model := ShuffleUnit()).modules():
        if isinstance(m, nn.BatchNorm2d):  # non-trivial statistics
            m.running_mean.uniform_(-1, 1), m.running_var.uniform_(0.5, 2)
    x = torch.randn(2, 3, 8, 8)
    plan, barriers = _plan(model, x)
    assert not barriers
    pruned = assert_equivalent(model, plan, x)
    # Shuffle column j holds channel j of each half: the stem's j (and, by the chunk, its 8 + j)
    # go with the branch's output j.
    kept = plan.keep["stem.weight"][0]
    assert len(kept) < 16 and plan.keep["branch.4.weight"][0] == [k for k in kept if k < 8]
    assert pruned.conv.in_channels < 16 and _removed(plan) == 1221 - 803


def test_channel_shuffle_with_literal_sizes_is_a_named_barrier() -> None:
    torch.manual_seed(0)
    model, x = ShuffleUnit(literal=True), torch.randn(2, 3, 8, 8)
    plan, barriers = _plan(model, x)
    assert len(barriers) == 1 and "view at test_graph_patterns.py:" in barriers[0], barriers
    assert "[2, 2, 8, 8, 8]" in barriers[0]
    assert "stem.weight" not in plan.keep and 0 in plan.keep["conv.weight"]  # the shuffled channels stay
    assert_equivalent(model, plan, x)


# --------------------------------------------------------------------------------------------
# 3. Foreign parametrizations (weight_norm).


class WeightNormed(nn.Module):
    """A conv with weight_norm over dim 2 (Wav2Vec2's positional conv) and a Linear with dim 0."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv1d(4, 8, 3, padding=1)
        self.pos = nn.utils.parametrizations.weight_norm(nn.Conv1d(8, 8, 3, padding=1, groups=2), dim=2)
        self.fc1 = nn.utils.parametrizations.weight_norm(nn.Linear(8, 16))
        self.fc2 = nn.Linear(16, 2)

    def forward(self, x: Tensor) -> Tensor:
        y = torch.relu(self.a(x))
        y = (y + self.pos(y)).mean(-1)
        return self.fc2(torch.relu(self.fc1(y)))


def test_weight_norm_prunes_output_rows_and_names_other_dims() -> None:
    torch.manual_seed(0)
    model, x = WeightNormed(), torch.randn(2, 4, 6)
    plan, barriers = _plan(model, x)
    assert len(barriers) == 1 and "in 'pos'" in barriers[0] and "pos.parametrizations.weight.original0" in barriers[0]
    g, v = "fc1.parametrizations.weight.original0", "fc1.parametrizations.weight.original1"
    assert len(plan.keep[g][0]) == len(plan.keep[v][0]) == len(plan.keep["fc1.bias"][0]) == 12
    assert not any(k.startswith(("pos.", "a.")) for k in plan.keep)  # dim 2's norm spans the channels
    pruned = plan.apply(copy.deepcopy(model)).eval()
    assert pruned.fc1.out_features == 12 and pruned.fc1.weight.shape == (12, 8) and pruned.fc2.in_features == 12
    # Zeroing v's rows would give 0/0 in the reference: zero g's (the row's scale) instead.
    reference = copy.copy(plan)
    reference.keep = {k: d for k, d in plan.keep.items() if k != v}
    torch.testing.assert_close(run(pruned, x), run(zeroed_copy(model.eval(), reference), x), atol=1e-5, rtol=1e-4)
    assert _removed(plan) == 48


def test_prunekit_masks_still_ask_for_finalize() -> None:
    model = WeightNormed()
    prunekit.prune(model, prunekit.UnstructuredConfig(sparsity=0.5))
    with pytest.raises(prunekit.ConfigError, match="finalize"):
        prunekit.plan(model, prunekit.ChannelConfig(ratio=0.3), torch.randn(2, 4, 6))


# --------------------------------------------------------------------------------------------
# 4. Per-head relative position bias.


class WindowAttention(nn.Module):
    """Swin-style: a (relative positions, heads) table indexed by a buffer, added per head."""

    def __init__(self, sdpa: bool, dim: int = 32, heads: int = 4, window: int = 3) -> None:
        super().__init__()
        self.sdpa, self.head_dim, self.area = sdpa, dim // heads, window * window
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))
        self.bias = RelativeBias(heads, window)
        self.fc = nn.Linear(dim, 3)

    def forward(self, x: Tensor) -> Tensor:
        b, t, _ = x.shape
        q, k, v = (f(x).view(b, t, -1, self.head_dim).transpose(1, 2) for f in (self.q, self.k, self.v))
        bias = self.bias(self.area)
        if self.sdpa:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        else:
            y = ((q @ k.transpose(-2, -1)) * self.head_dim**-0.5 + bias).softmax(-1) @ v
        return self.fc(torch.relu(self.o(y.transpose(1, 2).reshape(b, t, -1)))).mean(1)


class RelativeBias(nn.Module):
    def __init__(self, heads: int, window: int) -> None:
        super().__init__()
        self.table = nn.Parameter(torch.randn((2 * window - 1) ** 2, heads))
        coords = torch.stack(torch.meshgrid(torch.arange(window), torch.arange(window), indexing="ij")).flatten(1)
        rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0) + window - 1
        self.register_buffer("index", (rel[..., 0] * (2 * window - 1) + rel[..., 1]).reshape(-1), persistent=False)

    def forward(self, area: int) -> Tensor:
        return self.table[self.index].view(area, area, -1).permute(2, 0, 1).unsqueeze(0)


@pytest.fixture
def relative_bias_handler(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """A user's own module with a per-head table needs a layer handler: this is how one adds it."""
    scratch: Registry[type | str, LayerHandler] = Registry(layers.LAYER_HANDLERS.what)
    for key, handler in layers.LAYER_HANDLERS.items():
        scratch.register(key, handler)
    monkeypatch.setattr(layers, "LAYER_HANDLERS", scratch)
    register_layer_handler(RelativeBias, shrinkable=lambda m: {"table": (1,)}, outputs=lambda m: {})(lambda m: None)
    yield


@pytest.mark.parametrize("sdpa", [False, True])
def test_per_head_table_loses_the_pruned_heads(sdpa: bool, relative_bias_handler: None) -> None:
    torch.manual_seed(0)
    model, x = WindowAttention(sdpa), torch.randn(2, 9, 32)
    plan, _ = _plan(model, x, ratio=0.5)
    heads = [g for g in plan.groups if g["kind"] == "head"]
    assert heads and heads[0]["removed"] == 2, plan.summary()
    pruned = assert_equivalent(model, plan, x)
    assert pruned.bias.table.shape == (25, 2) and pruned.q.out_features == 16


def test_per_head_table_without_a_handler_keeps_the_heads() -> None:
    torch.manual_seed(0)
    model, x = WindowAttention(sdpa=True), torch.randn(2, 9, 32)
    plan, _ = _plan(model, x, ratio=0.5)
    assert not [g for g in plan.groups if g["kind"] == "head"] and "bias.table" not in plan.keep
    assert_equivalent(model, plan, x)  # no broadcast error: heads and table stay together


def test_hf_swin_relative_position_bias_follows_heads() -> None:
    transformers = pytest.importorskip("transformers")
    cfg = transformers.SwinConfig(
        image_size=16, patch_size=2, embed_dim=16, depths=[2], num_heads=[4], window_size=4, mlp_ratio=2.0
    )
    torch.manual_seed(0)
    model, x = transformers.SwinModel(cfg).eval(), torch.randn(1, 3, 16, 16)
    plan, barriers = _plan(model, x, ratio=0.5)
    assert not barriers  # shifted windows (aten.roll) included
    assert sum(g["removed"] for g in plan.groups if g["kind"] == "head") == 4, plan.summary()  # 2 of 4, 2 blocks
    pruned = assert_equivalent(model, plan, x, atol=1e-4)
    table = pruned.encoder.layers[0].blocks[1].attention.relative_position_bias.relative_position_bias_table
    assert table.shape[1] == 2 and pruned.config.num_heads == [4]  # a per-stage list is left alone


def test_hf_t5_relative_attention_bias_follows_heads() -> None:
    transformers = pytest.importorskip("transformers")
    cfg = transformers.T5Config(
        vocab_size=64, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4, relative_attention_num_buckets=8
    )
    torch.manual_seed(0)
    model = transformers.T5EncoderModel(cfg).eval()
    x = {"input_ids": torch.randint(0, 64, (2, 7))}
    plan, _ = _plan(model, x, ratio=0.5)
    (heads,) = [g for g in plan.groups if g["kind"] == "head"]  # one position bias, shared by both blocks
    assert heads["removed"] == 2 and "relative_attention_bias" in heads["name"]
    pruned = assert_equivalent(model, plan, x, atol=1e-4)
    attention = pruned.encoder.block[0].layer[0].SelfAttention
    assert attention.relative_attention_bias.weight.shape == (8, 2) and attention.n_heads == 2


# --------------------------------------------------------------------------------------------
# 5. LSTM / GRU / RNN.


class Recurrent(nn.Module):
    def __init__(self, cls: type[nn.RNNBase], **kwargs: object) -> None:
        super().__init__()
        self.inp = nn.Linear(5, 12)
        self.rnn = cls(12, 16, **kwargs)
        self.out = nn.Linear(16 * (2 if kwargs.get("bidirectional") else 1), 3)

    def forward(self, x: Tensor) -> Tensor:
        y, _ = self.rnn(torch.relu(self.inp(x)))
        return self.out(y[:, -1] if self.rnn.batch_first else y[-1])


def _rnn_params(inputs: int, hidden: int, gates: int, layers: int, dirs: int) -> int:
    widths = [inputs] + [hidden * dirs] * (layers - 1)
    return sum(dirs * gates * hidden * (w + hidden + 2) for w in widths)


@pytest.mark.parametrize(
    ("cls", "kwargs"),
    [
        (nn.LSTM, {"batch_first": True}),
        (nn.LSTM, {"batch_first": True, "num_layers": 2}),
        (nn.LSTM, {"num_layers": 2, "bidirectional": True}),
        (nn.GRU, {"batch_first": True}),
        (nn.GRU, {"num_layers": 2}),
        (nn.RNN, {"batch_first": True, "num_layers": 2}),
    ],
)
def test_recurrent_hidden_units_pruned_across_gates_and_layers(cls: type[nn.RNNBase], kwargs: dict[str, Any]) -> None:
    torch.manual_seed(0)
    model = Recurrent(cls, **kwargs)
    x = torch.randn(2, 4, 5) if kwargs.get("batch_first") else torch.randn(4, 2, 5)
    plan, barriers = _plan(model, x)
    assert not barriers
    pruned = assert_equivalent(model, plan, x)
    gates, layers, dirs = (
        {nn.LSTM: 4, nn.GRU: 3, nn.RNN: 1}[cls],
        kwargs.get("num_layers", 1),
        1 + kwargs.get("bidirectional", False),
    )
    assert pruned.rnn.hidden_size == 12 and pruned.rnn.weight_hh_l0.shape == (12 * gates, 12)
    assert pruned.rnn.input_size == pruned.inp.out_features == 9
    # 30% of 12 input features and of 16 hidden units (in every gate, layer and direction) go.
    rnn = _rnn_params(12, 16, gates, layers, dirs) - _rnn_params(9, 12, gates, layers, dirs)
    assert _removed(plan) == 3 * 6 + rnn + 4 * dirs * 3


def test_recurrent_state_from_the_caller_keeps_the_hidden_units() -> None:
    class WithState(Recurrent):
        def forward(self, x: Tensor, h0: Tensor) -> Tensor:  # type: ignore[override]
            y, _ = self.rnn(torch.relu(self.inp(x)), h0)
            return self.out(y[:, -1])

    torch.manual_seed(0)
    model = WithState(nn.GRU, batch_first=True)
    x = (torch.randn(2, 4, 5), torch.randn(1, 2, 16))
    plan = prunekit.plan(model.eval(), prunekit.ChannelConfig(ratio=0.3), x)
    assert not any(k.startswith("rnn.") and 0 in d for k, d in plan.keep.items())
    assert 0 in plan.keep["inp.weight"]  # the input projection still shrinks
    pruned = plan.apply(copy.deepcopy(model)).eval()
    with torch.no_grad():
        torch.testing.assert_close(pruned(*x), zeroed_copy(model, plan)(*x), atol=1e-5, rtol=1e-4)


def test_lstm_projection_is_a_named_barrier_and_the_rest_prunes() -> None:
    class Projected(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inp, self.rnn = nn.Linear(5, 12), nn.LSTM(12, 16, proj_size=4, batch_first=True)
            self.mid, self.out = nn.Linear(4, 32), nn.Linear(32, 3)

        def forward(self, x: Tensor) -> Tensor:
            y, _ = self.rnn(torch.relu(self.inp(x)))
            return self.out(torch.relu(self.mid(y[:, -1])))

    torch.manual_seed(0)
    model, x = Projected(), torch.randn(2, 4, 5)
    plan, barriers = _plan(model, x)
    assert len(barriers) == 1 and "lstm" in barriers[0] and "in 'rnn'" in barriers[0] and "proj_size" in barriers[0]
    assert not any(k.startswith(("rnn.", "inp.")) for k in plan.keep) and 0 in plan.keep["mid.weight"]
    assert_equivalent(model, plan, x)


# --------------------------------------------------------------------------------------------
# 6. Norms take their order before their dims (F.normalize, torch.norm).


class Normalized(nn.Module):
    """conv -> conv -> L2-normalise over `dim` -> conv: over channels the norm mixes them, over space not."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dim = dim
        self.c, self.a, self.b = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 16, 3, padding=1), nn.Conv2d(16, 4, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.b(F.normalize(torch.relu(self.a(torch.relu(self.c(x)))), dim=self.dim))


@pytest.mark.parametrize("dim", [1, 3])
def test_normalize_reads_its_dims_not_its_order(dim: int) -> None:
    torch.manual_seed(0)
    model, x = Normalized(dim), torch.randn(2, 3, 8, 8)
    plan, _ = _plan(model, x)
    assert "c.weight" in plan.keep  # before the norm: free either way
    assert (0 in plan.keep.get("a.weight", {})) == (dim == 3)  # a norm over a's channels needs every one
    assert_equivalent(model, plan, x)
