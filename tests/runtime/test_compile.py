"""torch.compile over an accelerated model: prunekit's kernels stay opaque ops, one graph, dense outputs."""

from __future__ import annotations

import copy
import gc
import pickle

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import prunekit as pk
from prunekit.runtime import candidates as cand
from prunekit.runtime import fusion, opaque

pytest.importorskip("numba")


class Block(nn.Module):
    """q/k/v siblings, attention, an output projection and a GELU MLP with a residual add."""

    def __init__(self, width: int = 64) -> None:
        super().__init__()
        self.q, self.k, self.v = (nn.Linear(width, width) for _ in range(3))
        self.out, self.up, self.down = nn.Linear(width, width), nn.Linear(width, 4 * width), nn.Linear(4 * width, width)
        self.norm = nn.LayerNorm(width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = (t.unflatten(-1, (4, -1)).transpose(1, 2) for t in (self.q(x), self.k(x), self.v(x)))
        h = x + self.out(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(-2))
        return self.norm(h + self.down(F.gelu(self.up(h))))


def _kernel(layer: nn.Linear, fqn: str, name: str = "numba_spmm_csr", siblings: int = 1) -> nn.Module:
    info = cand.LayerInfo(fqn, layer.weight.detach(), layer.bias.detach(), None, False, False, siblings)
    module = cand.get_candidate(name)(info)
    assert module is not None
    return module


def _accelerated() -> tuple[nn.Module, nn.Module]:
    """(pruned dense block, the same with prunekit's kernels: q/k/v fused (outputs apart), the rest per layer)."""
    torch.manual_seed(0)
    dense = pk.finalize(pk.prune(Block().eval(), pk.UnstructuredConfig(sparsity=0.9, scope="layer")))
    fast = copy.deepcopy(dense)
    layers = [dense.q, dense.k, dense.v]
    weight, bias = fusion.stacked([m.weight for m in layers], [m.bias for m in layers])
    group = fusion.FusedLinears(_kernel(_with(weight, bias), "qkv", siblings=3), [64] * 3, ["q", "k", "v"])
    assert group.split  # each of q, k, v comes back as its own array: no slicing copies
    fast.q, fast.k, fast.v = (group.member(i) for i in range(3))
    fast.out, fast.up = _kernel(dense.out, "out"), _kernel(dense.up, "up", "numba_csr")
    fast.down = _kernel(dense.down, "down")
    return dense, fast


def _with(weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    layer = nn.Linear(weight.shape[1], weight.shape[0])
    with torch.no_grad():
        layer.weight.copy_(weight)
        layer.bias.copy_(bias if bias is not None else torch.zeros(weight.shape[0]))
    return layer


def test_compiled_accelerated_model_is_one_graph_with_the_kernels_as_ops_and_matches_dense() -> None:
    dense, fast = _accelerated()
    x = torch.randn(2, 40, 64)  # 80 rows: the many-row kernel
    explained = torch._dynamo.explain(fast)(x)
    assert explained.graph_count == 1 and explained.graph_break_count == 0
    ops = [n for g in explained.graphs for n in g.graph.nodes if n.target is torch.ops.prunekit.linear_kernel.default]
    assert len(ops) == 4  # q/k/v stacked once, out, up, down
    compiled = torch.compile(fast)
    with torch.inference_mode():
        expected = dense(x)
        torch.testing.assert_close(compiled(x), expected, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(compiled(x[:, :3]), dense(x[:, :3]), rtol=1e-4, atol=1e-4)  # few rows


def test_a_copy_runs_its_own_weights_under_the_op() -> None:
    _, fast = _accelerated()
    twin = copy.deepcopy(fast.out)
    restored = pickle.loads(pickle.dumps(fast.down))
    assert len({fast.out._handle, twin._handle, fast.down._handle, restored._handle}) == 4
    with torch.no_grad():
        twin.bias.add_(1.0)
        x = torch.randn(3, 64)
        torch.testing.assert_close(opaque.linear_kernel(x, twin._handle), fast.out(x) + 1.0)
        h = torch.randn(3, 256)
        torch.testing.assert_close(opaque.linear_kernel(h, restored._handle), fast.down.eager(h))


def test_a_freed_kernel_is_named_not_run() -> None:
    _, fast = _accelerated()
    handle = fast.out._handle
    fast.out = nn.Identity()
    gc.collect()
    with pytest.raises(RuntimeError, match=f"kernel {handle} no longer exists"):
        opaque.linear_kernel(torch.randn(1, 64), handle)
