"""Masks on sharded (FSDP2 `fully_shard`) and replicated (DDP) models, with `torch.distributed` only.

Three ideas, each answering a way ranks could disagree:

- A mask is placed like its weight. On a DTensor weight (FSDP2) the mask is a DTensor with the
  weight's mesh and placements, so a rank stores only its shard: mask memory per rank scales as
  1/world like the weights. Inside FSDP2's forward the weight is the unsharded plain tensor; the
  mask is all-gathered there for the multiply (and again in backward, so no full mask stays alive
  between them), as FSDP2 does for the weight itself.
- Ranking is exact. `keep_top` keeps the `keep` highest scores of a list of tensors with one tie
  rule: higher score first; among equal scores, the lower global position (tensors in list order,
  then row-major within a tensor) first. On DTensor scores it runs a radix select over the float
  bit patterns with an all_reduce of 256-bin histograms (4 rounds for the threshold, at most 8 for
  the tie position), so the masks are bit-identical to one process ranking the full tensors.
- Ranks cannot drift. A DDP (replicated) model computes its masks on every rank; `apply` compares
  their checksums across ranks before mutating and raises on all ranks together if they differ
  (a rank-specific seed or data), rather than broadcasting and hiding the bug. `GradualPruner`
  checks that every rank calls `step` with the same step and update decision (one small
  all_reduce per call), so no rank updates its masks at a step the others skip.

Import cost: nothing here imports `torch.distributed.tensor` or FSDP. A DTensor can only exist
once its module is imported, so `is_dtensor` looks it up in `sys.modules`.
"""

from __future__ import annotations

import itertools
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.utils import parametrize

from prunekit.errors import PlanError

_RADIX_BITS = 8  # one byte per round: a 256-bin histogram all_reduce


def is_dtensor(t: object) -> bool:
    """True if `t` is a `torch.distributed.tensor.DTensor` (without importing that module)."""
    mod = sys.modules.get("torch.distributed.tensor")
    return mod is not None and isinstance(t, mod.DTensor)


def in_process_group() -> bool:
    """True inside an initialised `torch.distributed` process group of more than one rank."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank_and_world() -> tuple[int, int]:
    """(rank, world size); (0, 1) outside a process group of more than one rank."""
    return (dist.get_rank(), dist.get_world_size()) if in_process_group() else (0, 1)


def is_main_rank() -> bool:
    """True on rank 0, and in one process: the rank that logs, shows progress and writes files."""
    return rank_and_world()[0] == 0


def all_reduce_sum(t: Tensor) -> Tensor:
    """Sum `t` over ranks (a copy), on the device the backend reduces on (the rank's GPU for NCCL).

    Every rank must call it, in the same order as its other collectives; outside a process group
    it returns `t` unchanged.
    """
    if not in_process_group():
        return t
    buf = t.to(collective_device(None), copy=True)
    dist.all_reduce(buf)
    return buf.to(t.device)


def to_local(t: Tensor) -> Tensor:
    """This rank's shard of a DTensor; a plain tensor as it is."""
    return t.to_local() if is_dtensor(t) else t  # type: ignore[attr-defined, no-any-return]


def full_tensor(t: Tensor) -> Tensor:
    """The whole tensor (an all-gather for a DTensor: call on every rank); a plain tensor as it is."""
    return t.full_tensor() if is_dtensor(t) else t  # type: ignore[attr-defined, no-any-return]


def place_like(t: Tensor, like: Tensor) -> Tensor:
    """`t` placed as `like` is: a DTensor with `like`'s mesh and placements, or a plain tensor.

    A full plain `t` is sliced locally (no communication: every rank must hold the same `t`).
    """
    if not is_dtensor(like):
        return full_tensor(t).to(like.device)
    if is_dtensor(t):
        if t.device_mesh == like.device_mesh and t.placements == like.placements:  # type: ignore[attr-defined]
            return t
        return t.redistribute(like.device_mesh, like.placements)  # type: ignore[attr-defined, no-any-return]
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(t.to(like.device), like.device_mesh, like.placements,  # type: ignore[attr-defined]
                             src_data_rank=None)


# --------------------------------------------------------------------------------------------
# Exact top-k over tensors that may be sharded.


def ordered_keys(scores: Tensor) -> Tensor:
    """int32 keys ordered as the float32 `scores` (-0.0 == +0.0; no NaN): the bit patterns
    with the magnitude bits of negative numbers flipped."""
    bits = (scores.float() + 0.0).view(torch.int32)  # + 0.0 turns -0.0 into +0.0
    return bits ^ ((bits >> 31) & 0x7FFFFFFF)


def keep_top(scores: Sequence[Tensor], keep: int) -> list[Tensor]:
    """Bool masks keeping the `keep` highest scores of all `scores` together (True = keep).

    Ties: among equal scores the lower global position is kept (tensors in list order, then
    row-major), so the result does not depend on the device, the sharding or `torch.topk`.
    DTensor scores are ranked across ranks (a collective: call on every rank of their mesh) and
    give DTensor masks placed like them.
    """
    if any(is_dtensor(s) for s in scores):
        return _keep_top_sharded([(scores, keep)])[0]
    # float comparisons order as the keys do (-0.0 == +0.0, no NaN): no key conversion needed here
    flat = torch.cat([s.reshape(-1).float() for s in scores]) if len(scores) != 1 else scores[0].reshape(-1).float()
    n = flat.numel()
    if keep >= n:
        return [torch.ones_like(s, dtype=torch.bool) for s in scores]
    if keep <= 0:
        return [torch.zeros_like(s, dtype=torch.bool) for s in scores]
    threshold = flat.kthvalue(n - keep + 1).values  # the smallest kept score
    out = flat > threshold
    ties = (flat == threshold).nonzero().reshape(-1)  # ascending positions
    out[ties[: keep - int(out.sum())]] = True
    masks, start = [], 0
    for s in scores:
        masks.append(out[start : start + s.numel()].view(s.shape))
        start += s.numel()
    return masks


def keep_top_each(problems: Sequence[tuple[Sequence[Tensor], int]]) -> list[list[Tensor]]:
    """`keep_top(scores, keep)` for each of several independent `(scores, keep)` selections.

    On DTensor scores all selections share their collectives: one all_reduce per radix round for
    all of them, instead of one per round per selection (a model's layers, pruned layer by layer).
    """
    if any(is_dtensor(s) for scores, _ in problems for s in scores):
        return _keep_top_sharded(problems)
    return [keep_top(scores, keep) for scores, keep in problems]


def _mesh_group(mesh: Any) -> Any:
    if mesh.ndim == 1:
        return mesh.get_group()
    if mesh.size() == dist.get_world_size():
        return None  # the default group spans the mesh
    raise PlanError(f"ranking over a {mesh.ndim}-D device mesh that is not the whole world is not supported")


def counts_here(t: Tensor) -> bool:
    """Whether this rank counts its part of `t` in a global count: exactly one rank per element.

    A DTensor is replicated along its mesh's Replicate dims (HSDP): there only coordinate 0
    counts. A plain tensor in a sharded ranking is the same on every rank: only rank 0 counts it.
    """
    if not is_dtensor(t):
        return dist.get_rank() == 0
    coords = t.device_mesh.get_coordinate()  # type: ignore[attr-defined]
    if coords is None:
        return False
    return all(c == 0 for c, p in zip(coords, t.placements, strict=True) if not p.is_shard())  # type: ignore[attr-defined]


def _global_positions(t: Tensor, local_index: Tensor, base: int) -> Tensor:
    """Row-major positions in the full tensor (plus `base`) of the local elements `local_index`."""
    if not is_dtensor(t):
        return local_index + base
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    shape = tuple(t.shape)
    local_shape, offset = compute_local_shape_and_global_offset(shape, t.device_mesh, t.placements)  # type: ignore[attr-defined]
    coords = torch.stack(torch.unravel_index(local_index, tuple(local_shape)), dim=-1)
    coords = coords + torch.tensor(offset, dtype=torch.int64, device=coords.device)
    strides, acc = [], 1
    for size in reversed(shape):
        strides.append(acc)
        acc *= size
    stride = torch.tensor(strides[::-1], dtype=torch.int64, device=coords.device)
    return (coords * stride).sum(-1) + base


def _radix_select(
    values: list[list[Tensor]], ks: list[int], bits: int, group: Any, device: torch.device, signed: bool = False
) -> list[tuple[int, int, int]]:
    """For each problem p, the ks[p]-th smallest (1-based) of all ranks' integer `values[p]`.

    Values are below 2**bits (or signed). Returns per problem (value, how many are smaller, how
    many equal it), each over all ranks. A radix select, most significant byte first: each round
    all_reduces one 256-bin histogram per problem (all problems in one call) and keeps only the
    candidates in the chosen bin. Exact, no sort, no gather of values.
    """
    n = len(values)
    if n == 0:  # whether there is a problem is known on every rank alike: no collective skipped on one only
        return []
    prefix, below, equal = [0] * n, [0] * n, [0] * n
    rounds = max(1, -(-bits // _RADIX_BITS))
    for r in reversed(range(rounds)):
        hist = torch.zeros(n, 1 << _RADIX_BITS, dtype=torch.int64, device=device)
        digits: list[list[Tensor]] = []
        for p, vals in enumerate(values):
            ds = [(v >> (r * _RADIX_BITS)) & 0xFF for v in vals]
            if signed and r == rounds - 1:
                ds = [d ^ 0x80 for d in ds]  # two's complement: the sign byte orders as unsigned + 128
            for d in ds:
                hist[p] += torch.bincount(d.reshape(-1), minlength=1 << _RADIX_BITS).to(device)
            digits.append(ds)
        dist.all_reduce(hist, group=group)
        counts = hist.tolist()
        for p in range(n):
            cum = list(itertools.accumulate(counts[p]))
            bucket = next(b for b, c in enumerate(cum) if c >= ks[p] - below[p])
            below[p] += cum[bucket - 1] if bucket else 0
            prefix[p] = (prefix[p] << _RADIX_BITS) | bucket
            equal[p] = counts[p][bucket]
            values[p] = [v[d == bucket] for v, d in zip(values[p], digits[p], strict=True)]
    offset = 1 << (rounds * _RADIX_BITS - 1) if signed else 0
    return [(prefix[p] - offset, below[p], equal[p]) for p in range(n)]


def _keep_top_sharded(problems: Sequence[tuple[Sequence[Tensor], int]]) -> list[list[Tensor]]:
    from torch.distributed.tensor import DTensor

    meshes = {s.device_mesh for scores, _ in problems for s in scores if is_dtensor(s)}  # type: ignore[attr-defined]
    if len(meshes) != 1:
        raise PlanError(f"ranking tensors on {len(meshes)} different device meshes together is not supported")
    mesh = meshes.pop()
    group, device = _mesh_group(mesh), torch.device(mesh.device_type)
    sizes = [sum(s.numel() for s in scores) for scores, _ in problems]
    locals_ = [[to_local(s) for s in scores] for scores, _ in problems]
    keys = [[ordered_keys(t).reshape(-1) for t in ts] for ts in locals_]
    active = [p for p, (_, keep) in enumerate(problems) if 0 < keep < sizes[p]]

    def owned(p: int, tensors: list[Tensor]) -> list[Tensor]:  # each element counted by one rank
        return [t if counts_here(s) else t[:0] for t, s in zip(tensors, problems[p][0], strict=True)]

    picked = _radix_select([owned(p, keys[p]) for p in active], [sizes[p] - problems[p][1] + 1 for p in active],
                           32, group, device, signed=True)
    thresholds = {p: t for p, (t, _, _) in zip(active, picked, strict=True)}
    tie_pos: dict[int, list[Tensor]] = {}
    needed: dict[int, int] = {}
    for p, (_, below, equal) in zip(active, picked, strict=True):
        needed[p] = problems[p][1] - (sizes[p] - below - equal)  # how many of the ties at the threshold to keep
        if needed[p] < equal:
            positions, base = [], 0
            for s, k in zip(problems[p][0], keys[p], strict=True):
                positions.append(_global_positions(s, (k == thresholds[p]).nonzero().reshape(-1), base))
                base += s.numel()
            tie_pos[p] = positions
    cut_problems = list(tie_pos)
    cuts = _radix_select([owned(p, tie_pos[p]) for p in cut_problems], [needed[p] for p in cut_problems],
                         max((sizes[p].bit_length() for p in cut_problems), default=1), group, device)
    cut = {p: c for p, (c, _, _) in zip(cut_problems, cuts, strict=True)}
    results = []
    for p, (scores, keep) in enumerate(problems):
        if p not in thresholds:
            out = [torch.full(t.shape, keep > 0, dtype=torch.bool, device=t.device) for t in locals_[p]]
        else:
            out = []
            for i, k in enumerate(keys[p]):
                m = k > thresholds[p]
                ties = (k == thresholds[p]).nonzero().reshape(-1)
                m[ties if p not in cut else ties[tie_pos[p][i] <= cut[p]]] = True
                out.append(m)
        results.append([
            DTensor.from_local(m.view(t.shape), s.device_mesh, s.placements, shape=s.shape, stride=s.stride())  # type: ignore[attr-defined]
            if is_dtensor(s) else m.view(t.shape)
            for m, t, s in zip(out, locals_[p], scores, strict=True)
        ])
    return results


# --------------------------------------------------------------------------------------------
# Which ranks share a model, and checks that they agree.


def model_group(model: nn.Module) -> tuple[bool, Any] | None:
    """(sharded, process group) if `model` is spread over ranks, else None.

    Sharded: a DTensor parameter (FSDP2), the group of its mesh. Replicated: the model is a DDP
    wrapper (pass the wrapper, not `.module`, to get the rank checks), its process group.
    """
    if not in_process_group():
        return None
    for p in model.parameters():
        if is_dtensor(p):
            return True, _mesh_group(p.device_mesh)  # type: ignore[attr-defined]
    if isinstance(model, nn.parallel.DistributedDataParallel):
        return False, model.process_group
    return None


def collective_device(group: Any) -> torch.device:
    backend = str(dist.get_backend(group))
    if "gloo" in backend or "mpi" in backend or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", torch.cuda.current_device())


def mask_checksum(mask: Tensor, chunk: int = 1 << 24) -> list[int]:
    """(count, sum of positions, sum of squared positions) of the True elements, int64 wrap-around."""
    flat = to_local(mask).reshape(-1)
    total = [0, 0, 0]
    for start in range(0, flat.numel(), chunk):
        idx = flat[start : start + chunk].nonzero().reshape(-1) + start
        total[0] += idx.numel()
        total[1] = (total[1] + int(idx.sum())) % 2**64
        total[2] = (total[2] + int((idx * idx).sum())) % 2**64
    return [t - 2**64 if t >= 2**63 else t for t in total]


def check_same_on_ranks(masks: dict[str, Tensor], group: Any) -> None:
    """Raise `PlanError` on every rank if the replicated `masks` differ between ranks (a collective)."""
    rows = [mask_checksum(masks[k]) for k in sorted(masks)]
    mine = torch.tensor(rows or [[0, 0, 0]], dtype=torch.int64, device=collective_device(group))
    gathered = [torch.empty_like(mine) for _ in range(dist.get_world_size(group))]
    dist.all_gather(gathered, mine, group=group)
    keys = sorted(masks)
    differ = [keys[i] for i in range(len(keys)) if any(not torch.equal(g[i], gathered[0][i]) for g in gathered)]
    if differ:
        raise PlanError(f"masks differ between ranks of a replicated (DDP) model for {differ}: a rank-specific "
                        "seed or calibration data? Every rank must compute the same masks")


def check_same_step(step: int, update: bool, group: Any) -> None:
    """Raise on every rank unless all call with the same `step` and `update` (a collective)."""
    mine = torch.tensor([step, -step, int(update), -int(update)], dtype=torch.int64, device=collective_device(group))
    dist.all_reduce(mine, op=dist.ReduceOp.MAX, group=group)
    hi, lo, up_hi, up_lo = mine.tolist()
    if hi != -lo or up_hi != -up_lo:
        raise PlanError(f"ranks disagree on the pruning step: steps {-lo}..{hi}, update on some ranks only "
                        f"({bool(up_hi != -up_lo)}); call GradualPruner.step with the same global step on every rank")


# --------------------------------------------------------------------------------------------
# FSDP2 bookkeeping: a parametrization moves a parameter; FSDP2 must be told where it went.


def _fsdp_params(module: nn.Module) -> list[Any]:
    try:
        group = module._get_fsdp_state()._fsdp_param_group  # type: ignore[operator]
    except AttributeError as err:  # FSDP2 internals moved: say so instead of corrupting the model
        raise PlanError(f"cannot find FSDP2's parameters on {type(module).__name__} in this torch version: "
                        "attach masks before fully_shard") from err
    return list(group.fsdp_params) if group is not None else []


@contextmanager
def keeping_grad_accumulators() -> Iterator[None]:
    """Inside the block, `register_parametrization` keeps each Parameter's gradient accumulator."""
    # `register_parametrization` re-sets `original` to itself with `set_`, which gives the
    # Parameter a new gradient accumulator; DDP's reducer hooked the old one at wrap time and
    # would never see the weight's gradients again (also when `.module` of the wrapper is
    # pruned, which cannot be told from here). Setting a tensor to itself changes nothing else,
    # so skip exactly that call while masks are attached.
    real = getattr(parametrize, "_maybe_set", None)
    if real is None:  # a torch without the helper: nothing to skip
        yield
        return

    def maybe_set(dest: Tensor, src: Tensor) -> None:
        if dest is not src:
            real(dest, src)

    parametrize._maybe_set = maybe_set
    try:
        yield
    finally:
        parametrize._maybe_set = real


@contextmanager
def attaching_masks(model: nn.Module) -> Iterator[None]:
    """Let masks be attached to or removed from layers of `model` that FSDP2 or DDP holds.

    Registering a parametrization moves `weight` to `parametrizations.weight.original` (the same
    Parameter object). FSDP2 swaps sharded and unsharded parameters by module and name, so on exit
    each FSDP2 parameter is pointed at where its parameter now lives; the model is resharded on
    entry (FSDP2's public `reshard`), so masks always meet sharded weights. Parameters keep their
    gradient accumulators, so DDP's hooks keep firing (`set_mask` uses `keeping_grad_accumulators`).
    """
    fsdp = sys.modules.get("torch.distributed.fsdp")
    roots = [m for m in model.modules() if fsdp is not None and isinstance(m, fsdp.FSDPModule)]
    for m in roots:
        m.reshard()  # type: ignore[operator]
    params = [fp for m in roots for fp in _fsdp_params(m)]
    try:
        yield
    finally:
        if params:
            # Every place a parameter is registered: a tied one (embeddings and lm_head) has two,
            # and FSDP2 keeps the second in its shared modules; a parameter still found where
            # FSDP2 points stays pointed there.
            where: dict[int, list[tuple[nn.Module, str]]] = {}
            for mod in model.modules():
                for name, p in mod._parameters.items():
                    if p is not None:
                        where.setdefault(id(p), []).append((mod, name))
            for fp in params:
                info, places = fp._module_info, where.get(id(fp.sharded_param), [])
                # a removed ParametrizationList still holds the parameter: compare places, not holders
                if places and not any(mod is info.module and name == info.param_name for mod, name in places):
                    info.module, info.param_name = places[0]


class MaskedInPlace(torch.autograd.Function):
    """`weight * mask` for FSDP2's unsharded weight, written into the weight itself.

    The all-gathered weight is masked in place and returned as a view, so the layer saves
    FSDP2's own buffer for backward, freed after forward and gathered again before backward,
    instead of a full-size masked copy of every layer held from forward to backward (0.43 GB
    a rank on SmolLM2-135M). This rank's shard of the stored weight is zeroed where masked too,
    so that gather brings masked values back. The gradient is masked as `GatheredMask` masks it.
    Pruned originals are therefore not kept: use `GatheredMask` where they must be
    (straight-through masks, which pass them gradients).
    """

    @staticmethod
    def forward(ctx: Any, weight: Tensor, mask: Tensor, shard: Tensor) -> Tensor:
        ctx.mask = mask
        full = full_tensor(mask)
        weight.data.mul_(full)  # .data: FSDP2's buffer, without bumping the version autograd checks
        shard.to_local().data.mul_(to_local(mask))  # type: ignore[attr-defined]
        return weight.view_as(weight)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None]:
        return grad * full_tensor(ctx.mask).to(grad.dtype), None, None


class GatheredMask(torch.autograd.Function):
    """`weight * mask` for an unsharded weight (inside FSDP2's forward) and a sharded mask.

    The mask is all-gathered in forward and again in backward rather than saved, so between
    them a rank holds only its shard, as FSDP2 does for the weight. `straight_through` passes
    the gradient unmasked (see `prunekit.core.masks.Mask`).
    """

    @staticmethod
    def forward(ctx: Any, weight: Tensor, mask: Tensor, straight_through: bool) -> Tensor:
        ctx.mask, ctx.straight_through = mask, straight_through
        return weight * full_tensor(mask).to(weight.dtype)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None]:
        if ctx.straight_through:
            return grad, None, None
        return grad * full_tensor(ctx.mask).to(grad.dtype), None, None
