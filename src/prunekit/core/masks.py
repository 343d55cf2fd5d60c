"""Masks: the math (pure tensor functions), the `Mask` parametrization, and sparsity stats.

A mask lives on its layer as a `torch.nn.utils.parametrize` parametrization holding a bool
buffer, so `layer.weight` is always `original * mask`: optimizer steps update `original`,
but a pruned weight reads as zero until a schedule recomputes the mask (torchao's
`FakeSparsity` lifecycle: attach, update, `finalize`).
"""

from __future__ import annotations

import warnings
import weakref
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from prunekit.core.distributed import (
    GatheredMask,
    MaskedInPlace,
    attaching_masks,
    collective_device,
    counts_here,
    is_dtensor,
    keep_top,
    keep_top_each,
    keeping_grad_accumulators,
    model_group,
    place_like,
    to_local,
)
from prunekit.errors import CheckpointError, ConfigError

# --------------------------------------------------------------------------------------------
# Mask math: pure functions from scores to bool masks (True = keep).


def n_pruned(numel: int, sparsity: float) -> int:
    """How many of `numel` elements `sparsity` zeroes: round to nearest, so exact to one.

    A sparsity below 1 never zeroes all of them: on a tiny tensor (a layer of width 1) the
    nearest count can be all, which would cut the signal; one element is kept instead.
    """
    return min(max(numel - 1, 0), max(0, round(sparsity * numel)))


class SparsityRoundingWarning(UserWarning):
    """A sparsity rounds to none or all of a tiny layer's weights (filterable on its own, e.g.
    early in a gradual ramp where a small layer's first steps round to zero)."""


def warn_rounding(fqn: str, numel: int, sparsity: float, what: str = "weights") -> None:
    """Warn, naming the layer, when `sparsity` of `numel` rounds to none or all of them."""
    if sparsity <= 0 or numel <= 0:
        return
    nearest = round(sparsity * numel)
    if nearest == 0:
        warnings.warn(f"layer {fqn!r}: sparsity {sparsity:g} of its {numel} {what} rounds to 0; nothing is "
                      "pruned there (exclude it or raise the sparsity)", SparsityRoundingWarning, stacklevel=3)
    elif nearest >= numel:
        warnings.warn(f"layer {fqn!r}: sparsity {sparsity:g} of its {numel} {what} rounds to all of them; "
                      "one is kept (exclude it or lower the sparsity)", SparsityRoundingWarning, stacklevel=3)


def topk_mask(scores: Tensor, sparsity: float) -> Tensor:
    """Keep the highest-scoring `1 - sparsity` fraction of `scores`; exact element count.

    Equal scores keep the lower row-major position first. DTensor scores (FSDP2) are ranked
    across ranks exactly (`prunekit.core.distributed.keep_top`; call on every rank) and give a
    DTensor mask placed like them, equal to the mask of one process on the full scores.
    """
    if not 0.0 <= sparsity < 1.0:
        raise ConfigError(f"sparsity must be in [0, 1), got {sparsity!r}")
    return keep_top([scores], scores.numel() - n_pruned(scores.numel(), sparsity))[0]


def topk_masks(scores: dict[str, Tensor], sparsity: float) -> dict[str, Tensor]:
    """`topk_mask` of each tensor on its own (layer-wise pruning).

    On DTensor scores (FSDP2) the layers are ranked in the same collectives: a few all_reduces
    for the whole model instead of a few per layer.
    """
    if not 0.0 <= sparsity < 1.0:
        raise ConfigError(f"sparsity must be in [0, 1), got {sparsity!r}")
    problems = [([s], s.numel() - n_pruned(s.numel(), sparsity)) for s in scores.values()]
    return {k: masks[0] for k, masks in zip(scores, keep_top_each(problems), strict=True)}


def global_topk_masks(scores: dict[str, Tensor], sparsity: float) -> dict[str, Tensor]:
    """Rank all tensors' scores together and keep the top `1 - sparsity` of the union.

    Equal scores keep the earlier tensor (dict order), then the lower row-major position.
    """
    if not 0.0 <= sparsity < 1.0:
        raise ConfigError(f"sparsity must be in [0, 1), got {sparsity!r}")
    if not scores:
        return {}
    total = sum(s.numel() for s in scores.values())
    return dict(zip(scores, keep_top(list(scores.values()), total - n_pruned(total, sparsity)), strict=True))


# --------------------------------------------------------------------------------------------
# The parametrization.


class _StraightThrough(torch.autograd.Function):
    """w * mask forward; the gradient passes to every original weight unmasked (STE)."""

    @staticmethod
    def forward(ctx: Any, weight: Tensor, mask: Tensor) -> Tensor:
        return weight * mask

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        return grad, None


class Mask(nn.Module):
    """Parametrization `w -> w * mask`; the bool mask is a buffer, saved with the model.

    The multiply uses a copy of the mask in the weight's dtype, cached until the mask changes:
    float * bool takes a slow casting path that made masked training steps ~1.5x a dense step.

    With `straight_through=True` the backward pass skips the gradient's multiply by the mask
    (Bengio et al. 2013's straight-through estimator, as SR-STE uses for N:M): the effective
    weights are the same, pruned *originals* receive gradients but stay masked, and a step
    costs one element-wise pass less. Global-norm gradient clipping then sees those gradients.
    """

    mask: Tensor

    def __init__(self, mask: Tensor, straight_through: bool = False) -> None:
        super().__init__()
        self.register_buffer("mask", mask.to(torch.bool))
        self.straight_through = straight_through
        # (the mask tensor, its version counter, its copy); holding the tensor itself keeps its
        # identity check sound, and the version counter sees in-place updates (set_mask, load).
        self._cache: tuple[Tensor, int, Tensor] | None = None
        self._shard: weakref.ref[Tensor] | None = None  # the FSDP2-sharded weight this mask is placed on

    def __getstate__(self) -> dict[str, Any]:
        # A copy (deepcopy, pickle) is not placed on the original's shard and has no cache.
        return {**self.__dict__, "_shard": None, "_cache": None}

    def _dense_mask(self, like: Tensor) -> Tensor:
        cache = self._cache
        if (cache is None or cache[0] is not self.mask or cache[1] != self.mask._version
                or cache[2].dtype != like.dtype or cache[2].device != like.device):
            cache = (self.mask, self.mask._version, self.mask.to(like.dtype))
            self._cache = cache
        return cache[2]

    def forward(self, weight: Tensor) -> Tensor:
        if is_dtensor(self.mask) or is_dtensor(weight):
            return self._forward_sharded(weight)
        if self.straight_through:
            return _StraightThrough.apply(weight, self._dense_mask(weight))
        return weight * self._dense_mask(weight)

    def _forward_sharded(self, weight: Tensor) -> Tensor:
        if not is_dtensor(self.mask):  # attached before fully_shard: keep only this rank's shard
            self.place_like(weight)
        if not is_dtensor(weight):  # FSDP2's unsharded weight, inside its forward
            shard = self._shard() if self._shard is not None else None
            if shard is not None and not self.straight_through:
                return MaskedInPlace.apply(weight, self.mask, shard)
            return GatheredMask.apply(weight, self.mask, self.straight_through)
        mask = self.mask.to(weight.dtype)
        return _StraightThrough.apply(weight, mask) if self.straight_through else weight * mask

    def place_like(self, weight: Tensor) -> None:
        """Store the mask placed as `weight` is (its shard of a DTensor weight); mutates."""
        self.mask = place_like(self.mask, weight)
        self._cache = None  # a full-size copy of the old mask in the weight's dtype: 4 bytes a weight
        self._shard = weakref.ref(weight) if is_dtensor(weight) else None

    def extra_repr(self) -> str:
        local = to_local(self.mask)  # no collective: printing on one rank must not hang
        where = "this rank's shard " if is_dtensor(self.mask) else ""
        return f"shape={tuple(self.mask.shape)}, {where}sparsity={1 - local.float().mean():.4f}"


def get_mask(module: nn.Module, name: str = "weight") -> Mask | None:
    """The `Mask` parametrization on `module.<name>`, or None if it has none."""
    if not parametrize.is_parametrized(module, name):
        return None
    for p in module.parametrizations[name]:  # type: ignore[union-attr, index]
        if isinstance(p, Mask):
            return p
    return None


def set_mask(module: nn.Module, mask: Tensor, name: str = "weight", *, straight_through: bool = False) -> None:
    """Attach a mask to `module.<name>`, or overwrite the one already there (mutates).

    `straight_through` applies to a new mask only; an existing mask keeps its own setting.
    On a DTensor weight the mask is stored placed like it (each rank keeps its shard); a full
    `mask` must then be the same on every rank. Attaching a new mask to an FSDP2-sharded layer
    must run inside `prunekit.core.distributed.attaching_masks(model)`, as the verbs do.
    """
    existing = get_mask(module, name)
    if existing is not None:
        stored = base_tensor(module, name)
        if is_dtensor(stored) and not is_dtensor(existing.mask):
            existing.place_like(stored)
        existing.mask.copy_(place_like(mask, existing.mask))
        return
    stored = getattr(module, name)
    new = Mask(place_like(mask.to(torch.bool), stored), straight_through)
    new._shard = weakref.ref(stored) if is_dtensor(stored) else None
    with keeping_grad_accumulators():  # DDP hooked the Parameter's accumulator when it wrapped the model
        parametrize.register_parametrization(module, name, new)


def remove_mask(module: nn.Module, name: str = "weight", *, bake: bool = True) -> None:
    """Remove the mask from `module.<name>`; `bake=True` keeps the zeros in the weight."""
    if get_mask(module, name) is None:
        return
    # parametrize gives the module a generated class that `copy.deepcopy` shares with the
    # original, and removal deletes a property from that class: give this module its own
    # class first, so finalizing a copy never breaks the model it was copied from.
    cls = type(module)
    module.__class__ = type(cls.__name__, cls.__bases__, dict(cls.__dict__))
    original = module.parametrizations[name].original  # type: ignore[union-attr, index]
    with torch.no_grad():
        value = getattr(module, name) if bake else original
    if value.shape != original.shape or value.dtype != original.dtype:  # another parametrization reshapes
        parametrize.remove_parametrizations(module, name, leave_parametrized=True)
        return
    # Bake in place, keeping the Parameter object (FSDP2's, DDP's and the optimizer's references
    # to it): a DTensor has no `set_`, and `set_` would give the Parameter a new gradient
    # accumulator, orphaning the hooks DDP put on the old one.
    if bake:
        with torch.no_grad():
            original.copy_(value)
    parametrize.remove_parametrizations(module, name, leave_parametrized=False)


def masked_modules(model: nn.Module) -> dict[str, nn.Module]:
    """FQN -> module for every module whose `weight` carries a `Mask`."""
    return {fqn: m for fqn, m in model.named_modules() if get_mask(m) is not None}


def place_masks(model: nn.Module) -> None:
    """Keep only this rank's shard of each mask attached before `fully_shard` (mutates; no collective).

    A verb does this on first use. Training loops call it before the first forward, which sees
    FSDP2's unsharded weights and would otherwise keep the full masks (and a full float copy).
    """
    for module in masked_modules(model).values():
        stored, mask = base_tensor(module, "weight"), get_mask(module)
        if mask is not None and is_dtensor(stored) and not is_dtensor(mask.mask):
            mask.place_like(stored)


def finalize(model: nn.Module) -> nn.Module:
    """Remove every mask parametrization, leaving plain weights with zeros (mutates, returns).

    The forward pass is unchanged: each weight becomes `original * mask` as a plain Parameter.
    On an FSDP2-sharded model each rank bakes its own shard in place (the same sharded
    Parameter, now without a parametrization); call it on every rank.
    """
    with attaching_masks(model):
        for module in masked_modules(model).values():
            remove_mask(module, bake=True)
    return model


def mask_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """Masks keyed by the FQN of the tensor they mask (e.g. "fc1.weight").

    On an FSDP2-sharded model the values are DTensors (each rank's shard), under the same keys:
    `torch.distributed.checkpoint` saves and loads them sharded.
    """
    return {f"{fqn}.weight": get_mask(m).mask.clone() for fqn, m in masked_modules(model).items()}  # type: ignore[union-attr]


def load_mask_state_dict(model: nn.Module, masks: dict[str, Tensor]) -> nn.Module:
    """Attach the masks of `mask_state_dict` to `model` (validated first; mutates, returns)."""
    modules = dict(model.named_modules())
    for key, mask in masks.items():
        fqn = key.removesuffix(".weight")
        module = modules.get(fqn)
        if module is None or not hasattr(module, "weight"):
            raise CheckpointError(f"mask {key!r} names no layer with a weight in this model")
        if tuple(mask.shape) != tuple(module.weight.shape):
            raise CheckpointError(
                f"mask {key!r} has shape {tuple(mask.shape)}, layer weight is "
                f"{tuple(module.weight.shape)}"
            )
    with attaching_masks(model):
        for key, mask in masks.items():
            set_mask(modules[key.removesuffix(".weight")], mask)
    return model


# --------------------------------------------------------------------------------------------
# Measured sparsity.


@dataclass(frozen=True)
class SparsityReport:
    """Measured zeros: per prunable layer (by FQN) and over all of them together."""

    layers: dict[str, float] = field(default_factory=dict)
    numel: dict[str, int] = field(default_factory=dict)
    zeros: int = 0
    total_numel: int = 0

    @property
    def total(self) -> float:
        """Fraction of zeros over every counted weight."""
        return self.zeros / self.total_numel if self.total_numel else 0.0

    def __float__(self) -> float:
        return self.total

    def __str__(self) -> str:
        width = max([len(n) for n in self.layers] + [5])
        rows = [f"{'layer':<{width}}  {'params':>10}  sparsity"]
        rows += [f"{n:<{width}}  {self.numel[n]:>10}  {s:8.2%}" for n, s in self.layers.items()]
        rows.append(f"{'total':<{width}}  {self.total_numel:>10}  {self.total:8.2%}")
        return "\n".join(rows)


PRUNABLE_TYPES: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def sparsity(model: nn.Module) -> SparsityReport:
    """Measure the fraction of exact zeros in each prunable layer's weight and in total.

    On an FSDP2-sharded model each rank counts the zeros of its shards and one all_reduce sums
    them, so every rank reports what one process reports on the full weights (call it on every
    rank).
    """
    group = model_group(model)
    sharded = group is not None and group[0]
    counted: dict[str, tuple[int, int]] = {}
    with torch.no_grad():
        for fqn, module in model.named_modules():
            if not isinstance(module, PRUNABLE_TYPES) and get_mask(module) is None:
                continue
            w = module.weight
            # sharded: each element is counted on one rank, then one all_reduce sums the counts
            z = int((to_local(w) == 0).sum()) if not sharded or counts_here(w) else 0
            counted[fqn] = (z, w.numel())
    if sharded:
        total = torch.tensor([z for z, _ in counted.values()] or [0], dtype=torch.int64,
                             device=collective_device(group[1]))  # type: ignore[index]
        torch.distributed.all_reduce(total, group=group[1])  # type: ignore[index]
        counted = {f: (z, n) for (f, (_, n)), z in zip(counted.items(), total.tolist(), strict=False)}
    layers = {fqn: z / n for fqn, (z, n) in counted.items()}
    numel = {fqn: n for fqn, (_, n) in counted.items()}
    return SparsityReport(layers, numel, sum(z for z, _ in counted.values()), sum(numel.values()))


def base_tensor(module: nn.Module, name: str) -> Tensor:
    """The stored tensor behind `module.<name>`: the parametrization's original if masked."""
    if get_mask(module, name) is not None:
        return module.parametrizations[name].original  # type: ignore[union-attr, index]
    return getattr(module, name)


def nm_groups(t: Tensor, m: int) -> tuple[Tensor, tuple[int, ...]]:
    """The N:M group view: (out, in, *k) -> (groups, m) with groups running along `in`; also the
    permuted shape (`_from_groups` undoes it)."""
    moved = t.movedim(1, -1) if t.dim() > 2 else t  # (out, *k, in)
    return moved.reshape(-1, m), tuple(moved.shape)


def _from_groups(g: Tensor, shape: tuple[int, ...], dim: int) -> Tensor:
    t = g.reshape(shape)
    return t.movedim(-1, 1) if dim > 2 else t


def nm_mask(scores: Tensor, n: int, m: int) -> Tensor:
    """Keep the `n` highest scores in every group of `m` along dim 1 (True = keep).

    Raises:
        ConfigError: `n >= m`, or the input dimension is not a multiple of `m`.

    Example:
        >>> nm_mask(torch.tensor([[4.0, 1.0, 3.0, 2.0]]), 2, 4)
        tensor([[ True, False,  True, False]])
    """
    if not 1 <= n < m:
        raise ConfigError(f"N:M needs 1 <= n < m, got n={n}, m={m}")
    if scores.dim() < 2 or scores.shape[1] % m:
        raise ConfigError(f"N:M {n}:{m}: input dimension of shape {tuple(scores.shape)} is not a multiple of {m}")
    groups, shape = nm_groups(scores.float(), m)
    keep = torch.zeros_like(groups, dtype=torch.bool)
    keep.scatter_(1, torch.topk(groups, n, dim=1).indices, True)
    return _from_groups(keep, shape, scores.dim())
