"""Op rules for element-wise ops, concatenation and layers with parameters.

Linear, addmm (GPT-2's `Conv1D`), convolutions, batch/layer/group norms and embeddings couple
their input channels with a weight's columns and give the output the weight's rows. Shape ops
live in `shape.py`, activation @ activation matmuls in `matmul.py`; the table in `rules.py`.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch.fx import Node

from prunekit.structured.labels import Entry, Labels, entry_on, make_entry
from prunekit.structured.ops.rules import OpContext, args_of, kwarg, norm_dim, register_op_rule

aten = torch.ops.aten


def _param_entry(ctx: OpContext, arg: Any, dim: int) -> np.ndarray:
    fqn, shape = ctx.param_fqn(arg), ctx.shape(arg)
    assert fqn is not None and shape is not None  # callers check param_fqn first
    return ctx.atoms.param(fqn, dim, shape[dim])


def _weight_atoms(ctx: OpContext, w: Any, dim: int) -> np.ndarray:
    """Atoms of a weight's `dim`: its parameter's, or a computed weight's labels (weight_norm).

    A computed weight's positions are removable only where its labels trace them to
    parameter rows (-1, fixed, elsewhere).
    """
    if ctx.param_fqn(w) is not None:
        return _param_entry(ctx, w, dim)
    size = (ctx.shape(w) or ())[dim]
    e = entry_on(ctx.labels(w), dim)
    if e is None or len(e.dims) > 1:
        return np.full(size, -1, dtype=np.int64)
    return e.atoms


def _computed_weight(ctx: OpContext, node: Node, w: Any) -> Labels | None:
    """A named barrier for a layer whose weight is computed with no output rows traced (else None)."""
    if ctx.param_fqn(w) is not None or entry_on(ctx.labels(w), 0) is not None:
        return None
    for e in ctx.labels(w):
        ctx.atoms.pin_all(e)
    sources = sorted(_params_behind(ctx, w))[:3]
    behind = f" from {', '.join(sources)}" if sources else ""
    return ctx.barrier(
        node,
        f"its weight is computed{behind} (a parametrization prunekit cannot slice along the output "
        "channels, e.g. weight_norm over another dim), so the layer keeps its channels",
    )


def _params_behind(ctx: OpContext, node: Any, depth: int = 8) -> set[str]:
    fqn = ctx.param_fqn(node)
    if fqn is not None:
        return {fqn}
    if depth == 0 or not isinstance(node, Node):
        return set()
    return {f for arg in node.all_input_nodes for f in _params_behind(ctx, arg, depth - 1)}


def _expand_to(entry: Entry, dims: list[int], sizes: list[int]) -> np.ndarray:
    """`entry`'s atoms as an array over `dims` (sorted), broadcast along dims it lacks."""
    arr = entry.atoms
    for k, d in enumerate(dims):
        if d not in entry.dims:
            arr = np.expand_dims(arr, k)
    return np.broadcast_to(arr, sizes)


# --------------------------------------------------------------------------------------------
# Shape-preserving element-wise ops (also with broadcasting) and concatenation.


_UNARY = [
    aten.relu.default,
    aten.relu_.default,
    aten.gelu.default,
    aten.silu.default,
    aten.silu_.default,
    aten.sigmoid.default,
    aten.tanh.default,
    aten.hardtanh.default,
    aten.hardtanh_.default,
    aten.hardswish.default,
    aten.hardsigmoid.default,
    aten.leaky_relu.default,
    aten.elu.default,
    aten.mish.default,
    aten.softplus.default,
    aten.dropout.default,
    aten.clone.default,
    aten.contiguous.default,
    aten.alias.default,
    aten.detach.default,
    aten.detach_.default,
    aten.to.dtype,
    aten.to.dtype_layout,
    aten._to_copy.default,
    aten.neg.default,
    aten.abs.default,
    aten.exp.default,
    aten.log.default,
    aten.sqrt.default,
    aten.rsqrt.default,
    aten.pow.Tensor_Scalar,
    aten.erf.default,
    aten.sin.default,
    aten.cos.default,
    aten.lift_fresh_copy.default,
    aten.clamp.default,
    aten.clamp_min.default,
    aten.clamp_max.default,
    aten.relu6.default,
    aten.reciprocal.default,
    aten.type_as.default,
    aten.feature_dropout.default,
    aten.alpha_dropout.default,
    aten.gelu_.default,
    aten.square.default,
    aten.log_sigmoid.default,
]
_ELEMENTWISE = [
    aten.add.Tensor,
    aten.sub.Tensor,
    aten.mul.Tensor,
    aten.div.Tensor,
    aten.add_.Tensor,
    aten.mul_.Tensor,
    aten.where.self,
    aten.where.ScalarOther,
    aten.where.ScalarSelf,
    aten.where.Scalar,
    aten.maximum.default,
    aten.minimum.default,
    aten.pow.Tensor_Tensor,
    aten.masked_fill.Scalar,
    aten.masked_fill.Tensor,
    aten.eq.Tensor,
    aten.ne.Tensor,
    aten.lt.Tensor,
    aten.le.Tensor,
    aten.gt.Tensor,
    aten.ge.Tensor,
    aten.add.Scalar,
    aten.mul.Scalar,
    aten.sub.Scalar,
    aten.div.Scalar,
    aten.rsub.Scalar,
    aten.div.Tensor_mode,
    aten.eq.Scalar,
    aten.ne.Scalar,
    aten.lt.Scalar,
    aten.gt.Scalar,
    aten.ge.Scalar,
    aten.le.Scalar,
]


@register_op_rule(*_UNARY, *_ELEMENTWISE)
def elementwise(ctx: OpContext, node: Node) -> Labels:
    """Broadcasting element-wise op: operands' labels on shared positions are coupled.

    An operand that is full-size but unlabeled along a labeled dimension (a constant, a
    rotary cos table) pins that dimension: it may not shrink.
    """
    out = ctx.shape(node)
    if out is None:
        return []
    operands = [a for a in args_of(node) if isinstance(a, Node) and ctx.shape(a) is not None]
    return _broadcast_join(ctx, operands, out)


def _aligned(ctx: OpContext, arg: Node, rank: int) -> tuple[list[Entry], tuple[int, ...]]:
    """`arg`'s entries and shape, right-aligned to an output of rank `rank`."""
    shape = ctx.shape(arg) or ()
    off = rank - len(shape)
    entries = [Entry(tuple(d + off for d in e.dims), e.atoms) for e in ctx.labels(arg)]
    return entries, (1,) * off + tuple(shape)


def _clusters(entries: list[Entry]) -> list[list[Entry]]:
    """Group entries that share a dimension (transitively)."""
    clusters: list[list[Entry]] = []
    for e in entries:
        touching = [c for c in clusters if any(set(e.dims) & set(x.dims) for x in c)]
        merged = [e] + [x for c in touching for x in c]
        clusters = [c for c in clusters if c not in touching] + [merged]
    return clusters


def _broadcast_join(ctx: OpContext, operands: list[Node], out: tuple[int, ...]) -> Labels:
    rank = len(out)
    aligned = [_aligned(ctx, a, rank) for a in operands]
    result: Labels = []
    for cluster in _clusters([e for entries, _ in aligned for e in entries]):
        dims = sorted({d for e in cluster for d in e.dims})
        sizes = [out[d] for d in dims]
        arrays: list[np.ndarray] = []
        for entries, shape in aligned:
            mine = [e for e in entries if e in cluster]
            if len(mine) > 1:  # two separate labels meeting one: not representable, stay safe
                for e in cluster:
                    ctx.atoms.pin_all(e)
                arrays = []
                break
            if mine:
                e = mine[0]
                if any(shape[d] == 1 and out[d] > 1 for d in e.dims):
                    ctx.atoms.pin_all(e)  # one channel broadcast over many: never remove it
                    continue
                arrays.append(_expand_to(e, dims, sizes))
        if not arrays:
            continue
        for other in arrays[1:]:
            ctx.atoms.union(arrays[0], other)
        joined = make_entry(dims, np.ascontiguousarray(arrays[0]))
        for entries, shape in aligned:
            for d in dims:
                full_unlabeled = shape[d] == out[d] and out[d] > 1 and not any(d in e.dims for e in entries)
                if full_unlabeled:
                    ctx.atoms.pin(joined, joined.axis(d))
        result.append(joined)
    return result


@register_op_rule(aten.cat.default, aten.concat.default)
def cat(ctx: OpContext, node: Node) -> Labels:
    """Concatenation: positions along the cat dimension come from each input in turn."""
    out = ctx.shape(node)
    if out is None:
        return []
    rank = len(out)
    dim = norm_dim(args_of(node)[1] if len(args_of(node)) > 1 else kwarg(node, "dim", 0), rank)
    inputs = [a for a in args_of(node)[0] if isinstance(a, Node) and int(np.prod(ctx.shape(a) or (0,))) > 0]
    aligned = [_aligned(ctx, a, rank) for a in inputs]
    result: Labels = []
    for cluster in _clusters([e for entries, _ in aligned for e in entries]):
        dims = sorted({d for e in cluster for d in e.dims})
        pieces: list[np.ndarray] = []
        for entries, shape in aligned:
            mine = [e for e in entries if e in cluster]
            sizes = [shape[d] for d in dims]
            if len(mine) > 1:
                for e in cluster:
                    ctx.atoms.pin_all(e)
                pieces = []
                break
            pieces.append(_expand_to(mine[0], dims, sizes) if mine else np.full(sizes, -1, dtype=np.int64))
            if not mine and dim not in dims:
                pieces.pop()  # unlabeled along every labeled dim: pins them below
                joined_axes = [d for d in dims if shape[d] > 1]
                for e in cluster:
                    for d in joined_axes:
                        if d in e.dims:
                            ctx.atoms.pin(e, e.axis(d))
        if not pieces:
            continue
        if dim in dims:
            arr = np.concatenate(pieces, axis=dims.index(dim))
        else:
            for other in pieces[1:]:
                ctx.atoms.union(pieces[0], other)
            arr = pieces[0]
        result.append(make_entry(dims, np.ascontiguousarray(arr)))
    return result


# --------------------------------------------------------------------------------------------
# Layers with parameters.


def _couple_last(ctx: OpContext, labels: Labels, dim: int, atoms: np.ndarray) -> Labels:
    """Couple `labels` at `dim` with a weight's input atoms; return the labels of other dims."""
    e = entry_on(labels, dim)
    if e is None:
        ctx.atoms.freeze(atoms)  # an unlabeled input (model input, constant) feeds all columns
        return list(labels)
    if len(e.dims) == 1:
        ctx.atoms.union(e.atoms, atoms)
    else:
        ctx.atoms.union(e.atoms, np.expand_dims(atoms, tuple(i for i in range(e.atoms.ndim) if i != e.axis(dim))))
        ctx.atoms.pin_all(e)  # other axes would lose their labels here; keep them fixed
    return [x for x in labels if x is not e]


@register_op_rule(aten.linear.default)
def linear(ctx: OpContext, node: Node) -> Labels:
    """y = x W^T + b: x's last dim couples with W's columns; y's last dim is W's rows."""
    x, w = args_of(node)[0], args_of(node)[1]
    b = args_of(node)[2] if len(args_of(node)) > 2 else node.kwargs.get("bias")
    rank = len(ctx.shape(node) or ())
    refused = _computed_weight(ctx, node, w)
    if refused is not None:
        return refused
    rows = _weight_atoms(ctx, w, 0)
    rest = _couple_last(ctx, ctx.labels(x), rank - 1, _weight_atoms(ctx, w, 1))
    if isinstance(b, Node) and ctx.param_fqn(b) is not None:
        ctx.atoms.union(rows, _param_entry(ctx, b, 0))
    return rest + [Entry((rank - 1,), rows)]


@register_op_rule(aten.addmm.default)
def addmm(ctx: OpContext, node: Node) -> Labels:
    """bias + x @ W with W stored (in, out), as in GPT-2's `Conv1D`."""
    b, x, w = args_of(node)[0], args_of(node)[1], args_of(node)[2]
    if ctx.param_fqn(w) is None:
        return _barrier_like(ctx, node)
    cols = _param_entry(ctx, w, 1)
    rest = _couple_last(ctx, ctx.labels(x), 1, _param_entry(ctx, w, 0))
    if isinstance(b, Node) and ctx.param_fqn(b) is not None:
        ctx.atoms.union(cols, _param_entry(ctx, b, 0))
    return rest + [Entry((1,), cols)]


@register_op_rule(aten.conv1d.default, aten.conv2d.default, aten.conv3d.default)
def conv(ctx: OpContext, node: Node) -> Labels:
    """Convolution, also depthwise (groups = in channels) and grouped.

    Grouped convs keep their group count, so a channel removed from one group is removed at
    the same position in every group: positions are coupled across groups.
    """
    x, w = args_of(node)[0], args_of(node)[1]
    b = args_of(node)[2] if len(args_of(node)) > 2 else None
    groups = int(args_of(node)[6]) if len(args_of(node)) > 6 else 1
    refused = _computed_weight(ctx, node, w)
    if refused is not None:
        return refused
    w_shape = ctx.shape(w) or ()
    labels = ctx.labels(x)
    e = entry_on(labels, 1)
    for other in labels:  # batch and spatial labels do not survive a convolution
        if other is not e:
            ctx.atoms.pin_all(other)
    rows = _weight_atoms(ctx, w, 0)
    c_in = w_shape[1] * groups
    if e is not None and len(e.dims) > 1:
        ctx.atoms.pin_all(e)
        e = None
    inputs = e.atoms if e is not None else np.full(c_in, -1, dtype=np.int64)
    if groups > 1 and w_shape[1] == 1:  # depthwise, possibly with a channel multiplier
        ctx.atoms.union(rows, np.repeat(inputs, w_shape[0] // c_in))
    else:
        per_group = inputs.reshape(groups, -1)
        ctx.atoms.union(per_group, per_group[:1])
        ctx.atoms.union(per_group[0], _weight_atoms(ctx, w, 1))
        out_groups = rows.reshape(groups, -1)
        ctx.atoms.union(out_groups, out_groups[:1])
    if isinstance(b, Node) and ctx.param_fqn(b) is not None:
        ctx.atoms.union(rows, _param_entry(ctx, b, 0))
    return [Entry((1,), rows)]


@register_op_rule(aten._weight_norm.default)
def weight_norm(ctx: OpContext, node: Node) -> Labels:
    """w = g * v / ||v|| (Salimans & Kingma 2016), the norm over every dim but `dim`.

    Positions along `dim` (output channels for the default dim=0) go from g and v together and
    leave the other rows' norms alone; removing a position of another dim would rescale every
    row, so those are frozen (and with dim=-1 the norm spans everything).
    """
    v, g = args_of(node)[0], args_of(node)[1]
    dim = args_of(node)[2] if len(args_of(node)) > 2 else 0
    rank = len(ctx.shape(v) or ())
    dim = norm_dim(dim, rank) if dim != -1 else -1
    keep = entry_on(ctx.labels(v), dim) if dim >= 0 else None
    for arg in (v, g):
        for e in ctx.labels(arg):
            if keep is not None and e.dims == (dim,):
                ctx.atoms.union(keep.atoms, e.atoms)
            else:
                ctx.atoms.pin_all(e)
    return [Entry((dim,), keep.atoms)] if keep is not None and len(keep.dims) == 1 else []


@register_op_rule(aten.batch_norm.default, aten._native_batch_norm_legit_no_training.default)
def batch_norm(ctx: OpContext, node: Node) -> Any:
    """Per-channel affine and statistics: all of them follow the input's channels."""
    x = args_of(node)[0]
    labels = ctx.labels(x)
    e = entry_on(labels, 1)
    for arg in args_of(node)[1:5]:
        if isinstance(arg, Node) and ctx.param_fqn(arg) is not None:
            atoms = _param_entry(ctx, arg, 0)
            if e is not None and len(e.dims) == 1:
                ctx.atoms.union(e.atoms, atoms)
            else:
                ctx.atoms.freeze(atoms)
    if e is not None and len(e.dims) > 1:
        ctx.atoms.pin_all(e)
    if node.target is aten._native_batch_norm_legit_no_training.default:
        return [labels, [], []]
    return labels


@register_op_rule(aten.layer_norm.default, aten.group_norm.default, aten.rms_norm.default)
def norm_over_channels(ctx: OpContext, node: Node) -> Labels:
    """LayerNorm/RMSNorm/GroupNorm statistics mix the normalised channels: they are pinned."""
    x = args_of(node)[0]
    rank = len(ctx.shape(node) or ())
    if node.target is aten.group_norm.default:
        dims = {1}
    else:
        dims = {rank - k for k in range(1, len(args_of(node)[1]) + 1)}
    labels = ctx.labels(x)
    for e in labels:
        for d in dims & set(e.dims):
            ctx.atoms.pin(e, e.axis(d))
    return labels


@register_op_rule(aten.embedding.default)
def embedding(ctx: OpContext, node: Node) -> Labels:
    """Lookup rows of W: the output's last dim is W's columns."""
    w = args_of(node)[0]
    rank = len(ctx.shape(node) or ())
    if ctx.param_fqn(w) is None:
        return _barrier_like(ctx, node)
    return [Entry((rank - 1,), _param_entry(ctx, w, 1))]


def _barrier_like(ctx: OpContext, node: Node) -> Labels:
    for arg in node.all_input_nodes:
        for e in ctx.labels(arg):
            ctx.atoms.pin_all(e)
    return []
