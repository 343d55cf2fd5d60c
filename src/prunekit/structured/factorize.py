"""The SVD factorization of one Linear or Conv2d into a pair of thinner layers of rank r.

The weight, as a matrix W (out x in, or out x in*kh*kw for a conv), is replaced by its
truncated SVD W ~ U_r S_r V_r^T, the best rank-r approximation in Frobenius norm (Eckart and
Young 1936). sqrt(S_r) goes to both sides so the two factors have equal scale:
`down` = sqrt(S_r) V_r^T (in -> r, no bias), `up` = U_r sqrt(S_r) (r -> out, the layer's bias).

- Linear(in, out) -> Linear(in, r) -> Linear(r, out): Xue, Li and Gong 2013, "Restructuring of
  deep neural network acoustic models with singular value decomposition"; Denton et al. 2014.
- Conv2d(in, out, kxk) -> Conv2d(in, r, kxk, same stride/padding/dilation) -> Conv2d(r, out, 1x1):
  the channel decomposition of Zhang et al. 2015 ("Accelerating very deep convolutional networks
  for classification and detection", TPAMI; without their nonlinear response reconstruction),
  AIMET's "weight SVD". Jaderberg et al. 2014's spatial split (kx1 then 1xk, AIMET's "spatial
  SVD") is not offered: it cannot factor 1x1 convs, which hold most of the FLOPs of
  MobileNet/EfficientNet-style nets.

`down` keeps the original layer's class (a copy narrowed to r outputs), so a subclass's own
forward (EfficientNet's static "same" padding) still runs; `up` is a plain layer. The pair has
r * (in + out) weights against in * out, and its FLOPs scale the same way, so a layer whose
pair would not be smaller is left dense and the plan says so.
"""

from __future__ import annotations

import copy
from typing import Any, cast

import torch
from torch import Tensor, nn

from prunekit.errors import ConfigError, UnsupportedLayerError

Layer = nn.Linear | nn.Conv2d


def why_not_factorizable(module: nn.Module) -> str | None:
    """Why prunekit cannot factorize this kind of layer (None if it can)."""
    if not isinstance(module, (nn.Linear, nn.Conv2d)):
        return f"{type(module).__name__} is not supported (Linear and Conv2d only)"
    if getattr(module, "groups", 1) != 1:
        return f"grouped conv (groups={module.groups}) is not supported: only dense convs are factorized"
    return None


class FactorizedLayer(nn.Sequential):
    """A layer replaced by `down` (in -> rank, the original class) then `up` (rank -> out, bias)."""

    def __init__(self, down: nn.Module, up: nn.Module) -> None:
        super().__init__()
        self.down, self.up = down, up

    @property
    def rank(self) -> int:
        return int(self.up.weight.shape[1])  # type: ignore[index]


def weight_matrix(module: nn.Module) -> Tensor:
    """The weight as a matrix: (out, in) for a Linear, (out, in*kh*kw) for a Conv2d (a view)."""
    weight = cast(Tensor, module.weight)
    return weight.reshape(weight.shape[0], -1)


def energy_rank(singular_values: Tensor, energy: float, tolerance: float = 1e-6) -> int:
    """The smallest r whose top-r singular values keep `energy` of the sum of their squares.

    `tolerance` absorbs the rounding of float32 weights: a share within it of `energy` counts.
    """
    power = singular_values.double().pow(2)
    total = float(power.sum())
    if total == 0.0:
        return 1  # a zero matrix: any rank reproduces it
    kept = torch.cumsum(power, 0) / total
    return min(int((kept < energy - tolerance).sum()) + 1, len(power))


def _narrowed(module: Layer, weight: Tensor) -> Layer:
    """A copy of `module` (its class, padding, hooks) with `weight` and no bias; the original's
    tensors are not copied (they are mapped straight to the new ones in the deepcopy memo)."""
    memo: dict[int, Any] = {id(module.weight): nn.Parameter(weight, requires_grad=module.weight.requires_grad)}
    if module.bias is not None:
        memo[id(module.bias)] = None
    down = copy.deepcopy(module, memo)
    setattr(down, "out_features" if isinstance(module, nn.Linear) else "out_channels", weight.shape[0])
    return down


def factorize(module: nn.Module, rank: int, *, with_weights: bool = True) -> FactorizedLayer:
    """The rank-`rank` pair replacing a Linear or Conv2d (does not mutate `module`).

    Args:
        rank: 1 <= rank <= min(in, out); at min(in, out) the pair reproduces the layer exactly.
        with_weights: False builds the shapes only (zeros), for a replay that loads weights next.

    Raises:
        UnsupportedLayerError: not a Linear or an ungrouped Conv2d.
        ConfigError: `rank` outside [1, min(out, in)].

    Example:
        >>> pair = factorize(nn.Linear(8, 4), 2)
        >>> pair(torch.randn(3, 8)).shape, pair.rank
        (torch.Size([3, 4]), 2)
    """
    why = why_not_factorizable(module)
    if why is not None:
        raise UnsupportedLayerError(why)
    layer = cast(Layer, module)
    w = weight_matrix(layer).detach()
    out, inner = w.shape
    if not 1 <= rank <= min(out, inner):
        raise ConfigError(f"rank {rank} is outside [1, min(out {out}, in {inner})]")
    if with_weights:
        # float64 on the CPU (exact enough to test at full rank); float32 on accelerators
        u, s, vh = torch.linalg.svd(w.to(torch.float64 if w.device.type == "cpu" else torch.float32),
                                    full_matrices=False)
        root = s[:rank].sqrt()
        a, b = (root[:, None] * vh[:rank]).to(w.dtype), (u[:, :rank] * root).to(w.dtype)
    else:
        a, b = w.new_zeros(rank, inner), w.new_zeros(out, rank)
    up: Layer
    if isinstance(layer, nn.Linear):
        up = nn.Linear(rank, out, bias=layer.bias is not None, device=w.device, dtype=w.dtype)
    else:
        up = nn.Conv2d(rank, out, 1, bias=layer.bias is not None, device=w.device, dtype=w.dtype)
        a, b = a.reshape(rank, *layer.weight.shape[1:]), b.reshape(out, rank, 1, 1)
    with torch.no_grad():
        up.weight.copy_(b)
        if layer.bias is not None and up.bias is not None:
            up.bias.copy_(layer.bias)
    up.requires_grad_(layer.weight.requires_grad)
    pair = FactorizedLayer(_narrowed(layer, a.contiguous()), up)
    pair.train(layer.training)
    return pair
