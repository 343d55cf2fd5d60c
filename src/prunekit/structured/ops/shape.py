"""Op rules for shape ops (views, splits, indexing), reductions and pooling (see `rules.py` for the table)."""

from __future__ import annotations

import operator
from typing import Any

import numpy as np
import torch
from torch.fx import Node

from prunekit.structured.labels import Entry, Labels, make_entry
from prunekit.structured.ops.rules import OpContext, args_of, kwarg, norm_dim, register_op_rule
from prunekit.structured.source import literal_split_size

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


def reshape_labels(
    ctx: OpContext, labels: Labels, src: tuple[int, ...], dst: tuple[int, ...], node: Node | None = None
) -> Labels:
    """Labels of a tensor of shape `src` viewed as `dst` (row-major), exactly per element.

    With the view's `node`, a labeled dim split into several must lose whole slices (see
    `AtomGraph.keep_rectangular`; the dim spelled -1 is the one that shrinks, else the last),
    and the sizes it spells as numbers are noted (`OpContext.spells_sizes`).
    """
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
        if any(dst[d] > 1 for d in d_out):  # a size-1 dim (unsqueeze) holds no channels: drop it
            arr = arr.reshape([dst[d] for d in d_out if dst[d] > 1])
            d_out = [d for d in d_out if dst[d] > 1]
        arr = np.ascontiguousarray(arr)
        out.append(Entry(tuple(d_out), arr))
        if node is not None:
            _constrain_view(ctx, node, arr, d_out, [g for _, g in touched], len(dst))
    return out


def _spelled(node: Node, rank: int) -> list[Any]:
    """Per output dim, the size the view spells (an int, maybe -1), or None."""
    args = args_of(node)
    if node.target is aten.unflatten.int:
        sizes = list(args[2])
        dim = norm_dim(args[1], rank - len(sizes) + 1)
        return [None] * dim + sizes + [None] * (rank - dim - len(sizes))
    if node.target in (aten.view.default, aten.reshape.default, aten._unsafe_view.default) and len(args) > 1:
        sizes = list(args[1])
        return sizes if len(sizes) == rank else [None] * rank
    return [None] * rank


def _constrain_view(
    ctx: OpContext, node: Node, arr: np.ndarray, d_out: list[int], groups: list[list[int]], rank: int
) -> None:
    sizes = _spelled(node, rank)
    fixed = []
    for group in groups:
        g_dst = [d for d in group if d in d_out]
        axes = [d_out.index(d) for d in g_dst]
        if any(isinstance(sizes[d], int) and sizes[d] != -1 and sizes[d] > 1 for d in g_dst):
            fixed.append(arr)
        if len(g_dst) > 1:
            free = next((i for i, d in enumerate(g_dst) if sizes[d] == -1), len(g_dst) - 1)
            ctx.atoms.keep_rectangular(np.moveaxis(arr, axes, list(range(len(axes)))), free, len(axes))
    ctx.spells_sizes(node, fixed)


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
    return reshape_labels(ctx, ctx.labels(args_of(node)[0]), src, dst, node)


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


@register_op_rule(aten.roll.default)
def roll(ctx: OpContext, node: Node) -> Labels:
    """Shift positions along some dims (Swin's cyclic shift): labels on other dims pass."""
    x = args_of(node)[0]
    rank = len(ctx.shape(x) or ())
    dims_arg = (args_of(node)[2:3] or [kwarg(node, "dims", [])])[0]
    if isinstance(dims_arg, int):
        dims_arg = [dims_arg]
    dims = {norm_dim(d, rank) for d in dims_arg} if dims_arg else set(range(rank))
    out = []
    for e in ctx.labels(x):
        if dims & set(e.dims):
            ctx.atoms.pin_all(e)  # a channel's position moves: keep them all
        else:
            out.append(e)
    return out


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
    """Equal chunks of a labeled dim (GPT-2's packed q/k/v) shrink together: coupled by position.

    `chunk` and sizes computed in the source (`x.shape[1] // 2`, an attribute a layer handler
    updates) follow the pruned width; sizes written as numbers (`torch.split(x, 32, 1)`) do
    not, so that split is a named barrier (`source.literal_split_size` reads the line).
    """
    x = args_of(node)[0]
    shape = ctx.shape(x) or ()
    dim = norm_dim(args_of(node)[2] if len(args_of(node)) > 2 else kwarg(node, "dim", 0), len(shape))
    outs = node.meta.get("val") or []
    sizes = [int(o.shape[dim]) for o in outs]
    result: list[Labels] = [[] for _ in sizes]
    on_dim = [e for e in ctx.labels(x) if dim in e.dims]
    if on_dim and node.target is not aten.chunk.default:
        if literal_split_size(node):
            ctx.barrier(
                node,
                f"its sizes {args_of(node)[1]} are numbers in the source, so the split dim keeps "
                "its width; compute them from the shape (x.shape[d] // n) or use chunk to let it shrink",
            )
            return result
        ctx.spells_sizes(node, [e.atoms for e in on_dim])
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


@register_op_rule(aten.index.Tensor)
def index(ctx: OpContext, node: Node) -> Labels:
    """`x[idx]` with one index tensor (a relative-position bias table looked up per pair).

    The indexed dim's positions are data (pinned); the other dims keep their labels, so a
    per-head table `(positions, heads)` shrinks with the heads it is added to.
    """
    x, indices = args_of(node)[0], list(args_of(node)[1])
    shape, out = ctx.shape(x), ctx.shape(node)
    picked = [k for k, i in enumerate(indices) if i is not None]
    idx_shape = ctx.shape(indices[picked[0]]) if len(picked) == 1 else None
    if shape is None or out is None or idx_shape is None:
        return source(ctx, node)
    k, extra = picked[0], len(idx_shape) - 1
    if out != shape[:k] + idx_shape + shape[k + 1 :]:  # a bool mask, or indices not as expected
        return source(ctx, node)
    result = []
    for e in ctx.labels(x):
        if k in e.dims:
            ctx.atoms.pin_all(e)  # which positions are read is data: they all stay
            continue
        result.append(Entry(tuple(d if d < k else d + extra for d in e.dims), e.atoms))
    for i in indices:
        if isinstance(i, Node):
            for e in ctx.labels(i):
                ctx.atoms.pin_all(e)
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


_DIMS_AT: dict[Any, int] = {aten.norm.ScalarOpt_dim: 2, aten.linalg_vector_norm.default: 2}


@register_op_rule(*_REDUCTIONS)
def reduce(ctx: OpContext, node: Node) -> Any:
    """Reducing over a labeled dim mixes its channels (a mean changes if one is dropped): pin it."""
    args: list[Any] = list(args_of(node))
    x = args[0]
    rank = len(ctx.shape(x) or ())
    at = _DIMS_AT.get(node.target, 1)  # the norms take their order first: norm(x, p, dim, keepdim)
    dims_arg: Any = args[at] if len(args) > at else node.kwargs.get("dim")
    if isinstance(dims_arg, int):
        dims_arg = [dims_arg]
    dims = set(range(rank)) if not dims_arg else {norm_dim(d, rank) for d in dims_arg}
    keep = bool(args[at + 1]) if len(args) > at + 1 and isinstance(args[at + 1], bool) else bool(
        node.kwargs.get("keepdim", False))
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
