"""Op rules for shape ops, reductions, pooling and attention (see `rules.py` for the table)."""

from __future__ import annotations

import operator
from typing import Any

import numpy as np
import torch
from torch.fx import Node

from prunekit.structured.labels import Entry, Labels, entry_on, make_entry
from prunekit.structured.ops.rules import OpContext, args_of, kwarg, norm_dim, register_op_rule

aten = torch.ops.aten

# Ops that make new tensors from nothing channel-related, or only check things.
_SOURCES = [
    aten.arange.default,
    aten.arange.start,
    aten.arange.start_step,
    aten.zeros.default,
    aten.ones.default,
    aten.full.default,
    aten.empty.memory_format,
    aten.scalar_tensor.default,
    aten.zeros_like.default,
    aten.ones_like.default,
    aten.full_like.default,
    aten.new_zeros.default,
    aten.new_ones.default,
    aten.new_full.default,
    aten._assert_tensor_metadata.default,
    aten._assert_scalar.default,
    aten.sym_size.int,
    aten.sym_constrain_range_for_size.default,
    aten.gather.default,
    aten.index.Tensor,
    aten.tril.default,
    aten.triu.default,
    aten.logical_not.default,
    aten.bitwise_not.default,
    aten.logical_and.default,
    aten.logical_or.default,
    aten.bitwise_and.Tensor,
    aten.bitwise_or.Tensor,
    aten.cumsum.default,
    aten.empty_like.default,
]


@register_op_rule(*_SOURCES)
def source(ctx: OpContext, node: Node) -> Labels:
    """Creates or indexes tensors from non-channel data: labeled inputs are pinned."""
    for arg in node.all_input_nodes:
        if ctx.param_fqn(arg) is None:
            for e in ctx.labels(arg):
                ctx.atoms.pin_all(e)
    return []


# --------------------------------------------------------------------------------------------
# Views.


def reshape_groups(src: tuple[int, ...], dst: tuple[int, ...]) -> list[tuple[list[int], list[int]]] | None:
    """Pair runs of input dims with runs of output dims of equal product (None: cannot)."""
    groups, i, j = [], 0, 0
    while i < len(src) or j < len(dst):
        gi, gj, pi, pj = [], [], 1, 1
        if i < len(src):
            gi.append(i)
            pi *= src[i]
            i += 1
        if j < len(dst):
            gj.append(j)
            pj *= dst[j]
            j += 1
        while pi != pj:
            if pi < pj and i < len(src):
                gi.append(i)
                pi *= src[i]
                i += 1
            elif pj < pi and j < len(dst):
                gj.append(j)
                pj *= dst[j]
                j += 1
            else:
                return None
        groups.append((gi, gj))
    return groups


def reshape_labels(ctx: OpContext, labels: Labels, src: tuple[int, ...], dst: tuple[int, ...]) -> Labels:
    """Labels of a tensor of shape `src` viewed as `dst` (row-major), exactly per element."""
    if not labels:
        return []
    groups = reshape_groups(src, dst) if 0 not in src else None
    if groups is None:
        for e in labels:
            ctx.atoms.pin_all(e)
        return []
    out: Labels = []
    claimed: set[int] = set()
    for e in labels:
        touched = [g for g in groups if set(g[0]) & set(e.dims)]
        ids = {id(g) for g in touched}
        if ids & claimed:  # two entries in one reshape group: per-element pairs are not representable
            ctx.atoms.pin_all(e)
            continue
        claimed |= ids
        d_in = sorted(d for g in touched for d in g[0])
        d_out = sorted(d for g in touched for d in g[1])
        arr = e.atoms
        for k, d in enumerate(d_in):
            if d not in e.dims:
                arr = np.expand_dims(arr, k)
        arr = np.broadcast_to(arr, [src[d] for d in d_in]).reshape([dst[d] for d in d_out])
        out.append(Entry(tuple(d_out), np.ascontiguousarray(arr)))
    return out


@register_op_rule(
    aten.view.default,
    aten.reshape.default,
    aten._unsafe_view.default,
    aten.flatten.using_ints,
    aten.unflatten.int,
    aten.unsqueeze.default,
    aten.squeeze.dim,
    aten.squeeze.dims,
    aten.squeeze.default,
    aten.view_as.default,
    aten.reshape_as.default,
)
def view(ctx: OpContext, node: Node) -> Labels:
    """Any view that keeps element order: reshape, flatten, unflatten, (un)squeeze."""
    src, dst = ctx.shape(args_of(node)[0]), ctx.shape(node)
    if src is None or dst is None:
        return []
    return reshape_labels(ctx, ctx.labels(args_of(node)[0]), src, dst)


@register_op_rule(aten.transpose.int, aten.permute.default, aten.t.default, aten.swapaxes.default)
def permute(ctx: OpContext, node: Node) -> Labels:
    """Reorder dims: each entry's dims are renamed."""
    rank = len(ctx.shape(node) or ())
    if node.target is aten.permute.default:
        order = [norm_dim(d, rank) for d in args_of(node)[1]]
    else:
        if node.target is aten.t.default:
            a, b = 0, 1
        else:
            a, b = norm_dim(args_of(node)[1], rank), norm_dim(args_of(node)[2], rank)
        order = list(range(rank))
        order[a], order[b] = order[b], order[a]
    where = {old: new for new, old in enumerate(order)}
    return [make_entry([where[d] for d in e.dims], e.atoms) for e in ctx.labels(args_of(node)[0])]


@register_op_rule(aten.expand.default, aten.expand_as.default)
def expand(ctx: OpContext, node: Node) -> Labels:
    """Broadcast size-1 dims (new leading dims shift the rest)."""
    src, dst = ctx.shape(args_of(node)[0]) or (), ctx.shape(node) or ()
    off = len(dst) - len(src)
    out = []
    for e in ctx.labels(args_of(node)[0]):
        dims = tuple(d + off for d in e.dims)
        if any(src[d] == 1 and dst[d + off] > 1 for d in e.dims):
            ctx.atoms.pin_all(e)
            continue
        out.append(Entry(dims, e.atoms))
    return out


@register_op_rule(aten.select.int, aten.unbind.int)
def select(ctx: OpContext, node: Node) -> Any:
    """Pick index i of a dim: if labeled, that dim must keep its size (so i stays i)."""
    x = args_of(node)[0]
    shape = ctx.shape(x) or ()
    rank = len(shape)
    dim = norm_dim(args_of(node)[1] if len(args_of(node)) > 1 else 0, rank)
    picks = [args_of(node)[2]] if node.target is aten.select.int else list(range(shape[dim]))
    outs = []
    for index in picks:
        labels = []
        for e in ctx.labels(x):
            if dim in e.dims:
                ctx.atoms.pin(e, e.axis(dim))
                if len(e.dims) == 1:
                    continue
                arr = np.take(e.atoms, norm_dim(index, shape[dim]), axis=e.axis(dim))
                labels.append(Entry(tuple(d - (d > dim) for d in e.dims if d != dim), arr))
            else:
                labels.append(Entry(tuple(d - (d > dim) for d in e.dims), e.atoms))
        outs.append(labels)
    return outs[0] if node.target is aten.select.int else outs


@register_op_rule(aten.slice.Tensor)
def slice_(ctx: OpContext, node: Node) -> Labels:
    """x[start:end:step] on a dim: a partial slice of a labeled dim pins it."""
    x = args_of(node)[0]
    shape = ctx.shape(x) or ()
    dim = norm_dim(args_of(node)[1] if len(args_of(node)) > 1 else 0, len(shape))
    start = args_of(node)[2] if len(args_of(node)) > 2 else None
    end = args_of(node)[3] if len(args_of(node)) > 3 else None
    step = args_of(node)[4] if len(args_of(node)) > 4 else 1
    index = range(shape[dim])[slice(start, end, step)]
    out = []
    for e in ctx.labels(x):
        if dim not in e.dims:
            out.append(e)
            continue
        if len(index) == shape[dim]:
            out.append(e)
            continue
        ctx.atoms.pin(e, e.axis(dim))
        if len(e.dims) > 1:
            out.append(Entry(e.dims, np.take(e.atoms, list(index), axis=e.axis(dim))))
    return out


@register_op_rule(aten.split.Tensor, aten.split_with_sizes.default, aten.chunk.default)
def split(ctx: OpContext, node: Node) -> list[Labels]:
    """Equal chunks of a labeled dim (GPT-2's packed q/k/v) shrink together: coupled by position."""
    x = args_of(node)[0]
    shape = ctx.shape(x) or ()
    dim = norm_dim(args_of(node)[2] if len(args_of(node)) > 2 else kwarg(node, "dim", 0), len(shape))
    outs = node.meta.get("val") or []
    sizes = [int(o.shape[dim]) for o in outs]
    result: list[Labels] = [[] for _ in sizes]
    for e in ctx.labels(x):
        if dim not in e.dims:
            for r in result:
                r.append(e)
            continue
        axis = e.axis(dim)
        if len(set(sizes)) == 1:
            parts = np.split(e.atoms, len(sizes), axis=axis)
            for p in parts[1:]:
                ctx.atoms.union(parts[0], p)
        else:
            ctx.atoms.pin(e, axis)
            parts = np.split(e.atoms, np.cumsum(sizes)[:-1], axis=axis)
        for r, p in zip(result, parts, strict=True):
            r.append(Entry(e.dims, np.ascontiguousarray(p)))
    return result


@register_op_rule(operator.getitem)
def getitem(ctx: OpContext, node: Node) -> Labels:
    """One output of a multi-output op."""
    source, index = args_of(node)
    labels = ctx.labels(source)
    if labels and isinstance(labels[0], list):
        return labels[index]  # type: ignore[return-value]
    return [] if index else labels


# --------------------------------------------------------------------------------------------
# Reductions, softmax, pooling.


_REDUCTIONS = [
    aten.mean.dim,
    aten.sum.dim_IntList,
    aten.amax.default,
    aten.amin.default,
    aten.var.correction,
    aten.std.correction,
    aten.max.dim,
    aten.min.dim,
    aten.mean.default,
    aten.sum.default,
    aten.logsumexp.default,
    aten.argmax.default,
    aten.norm.ScalarOpt_dim,
    aten.linalg_vector_norm.default,
]


@register_op_rule(*_REDUCTIONS)
def reduce(ctx: OpContext, node: Node) -> Any:
    """Reducing over a labeled dim mixes its channels (a mean changes if one is dropped): pin it."""
    x = args_of(node)[0]
    shape = ctx.shape(x) or ()
    rank = len(shape)
    dims_arg = args_of(node)[1] if len(args_of(node)) > 1 else None
    if isinstance(dims_arg, int):
        dims_arg = [dims_arg]
    dims = set(range(rank)) if not dims_arg else {norm_dim(d, rank) for d in dims_arg}
    keep = (
        bool(args_of(node)[2])
        if len(args_of(node)) > 2 and isinstance(args_of(node)[2], bool)
        else bool(node.kwargs.get("keepdim", False))
    )
    out = []
    for e in ctx.labels(x):
        hit = dims & set(e.dims)
        for d in hit:
            ctx.atoms.pin(e, e.axis(d))
        rest = [d for d in e.dims if d not in hit]
        if not rest:
            continue
        arr = e.atoms
        for d in sorted(hit, reverse=True):
            arr = np.take(arr, 0, axis=e.axis(d))
        new = rest if keep else [d - sum(r < d for r in dims) for d in rest]
        out.append(Entry(tuple(new), arr))
    if node.target in (aten.max.dim, aten.min.dim):
        return [out, []]
    return out


@register_op_rule(aten.softmax.int, aten._softmax.default, aten.log_softmax.int, aten._log_softmax.default)
def softmax(ctx: OpContext, node: Node) -> Labels:
    """Softmax normalises over one dim: that dim is pinned, the rest pass."""
    labels = ctx.labels(args_of(node)[0])
    dim = norm_dim(args_of(node)[1], len(ctx.shape(node) or ()))
    for e in labels:
        if dim in e.dims:
            ctx.atoms.pin(e, e.axis(dim))
    return labels


_SPATIAL = [
    aten.adaptive_avg_pool1d.default,
    aten.adaptive_avg_pool2d.default,
    aten.adaptive_avg_pool3d.default,
    aten.avg_pool1d.default,
    aten.avg_pool2d.default,
    aten.avg_pool3d.default,
    aten.max_pool1d.default,
    aten.max_pool2d.default,
    aten.max_pool3d.default,
    aten.max_pool2d_with_indices.default,
    aten.upsample_nearest2d.vec,
    aten.upsample_bilinear2d.vec,
    aten.constant_pad_nd.default,
    aten.pad.default,
    aten.pixel_shuffle.default,
]


@register_op_rule(*_SPATIAL)
def spatial(ctx: OpContext, node: Node) -> Any:
    """Pooling, padding, resizing act on dims 2+ per channel: channel labels pass unchanged."""
    labels = ctx.labels(args_of(node)[0])
    out = []
    for e in labels:
        if any(d >= 2 for d in e.dims) or node.target is aten.pixel_shuffle.default:
            ctx.atoms.pin_all(e)
        else:
            out.append(e)
    if node.target is aten.max_pool2d_with_indices.default:
        return [out, []]
    return out


# --------------------------------------------------------------------------------------------
# Attention.


def _heads(ctx: OpContext, arg: Any, head_dim: int, rank: int) -> np.ndarray | None:
    """One atom per head of q/k/v (a head's rows unioned); None if heads are not labeled."""
    labels = ctx.labels(arg)
    e = entry_on(labels, head_dim)
    for other in labels:
        if other is not e:
            ctx.atoms.pin_all(other)
    if e is None:
        return None
    axis = e.axis(head_dim)
    rows = np.moveaxis(e.atoms, axis, 0).reshape(e.atoms.shape[axis], -1)
    ctx.atoms.union(rows, rows[:, :1])  # a head is removed whole: its rows in every position
    ctx.atoms.heads.append(rows[:, 0])
    return rows[:, 0]


@register_op_rule(aten.scaled_dot_product_attention.default)
def attention(ctx: OpContext, node: Node) -> Labels:
    """softmax(q k^T) v per head; heads are the unit, a query head follows its key/value head.

    Grouped-query attention appears either as keys/values repeated to the query head count
    before the op (their labels already repeat) or as `enable_gqa=True` (repeated here).
    """
    q, k, v = args_of(node)[:3]
    rank = len(ctx.shape(node) or ())
    head_dim = rank - 3
    heads = [_heads(ctx, t, head_dim, rank) for t in (q, k, v)]
    for arg in args_of(node)[3:4]:
        if isinstance(arg, Node):
            for e in ctx.labels(arg):
                ctx.atoms.pin_all(e)
    if any(h is None for h in heads):
        for h in heads:
            if h is not None:
                ctx.atoms.freeze(h)
        return []
    hq, hk, hv = heads
    assert hq is not None and hk is not None and hv is not None
    group = len(hq) // max(len(hk), 1)
    ctx.atoms.union(hq, np.repeat(hk, group))
    ctx.atoms.union(hq, np.repeat(hv, group))
    out = ctx.shape(node) or ()
    arr = np.broadcast_to(hq[:, None], (len(hq), out[-1]))
    return [Entry((head_dim, rank - 1), np.ascontiguousarray(arr))]
