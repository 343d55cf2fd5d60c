"""Op rule for activation @ activation matmuls: hand-written (eager) attention.

`softmax(q @ k^T / sqrt(d)) @ v`, written out with `view`/`transpose`/`matmul` instead of
`scaled_dot_product_attention`, is still multi-head attention: the batch dims of the matmul
index heads, and a head can go as long as it goes from q, k and v at once (its rows in the
q/k/v projections and its columns in the output projection). So the rule:

- collapses each operand's labels over its batch dims to one atom per batch position (a head
  is removed whole, as `shape.attention` does) and couples the two operands' atoms;
- lets the output carry those head atoms over its batch dims and over a free dim (rows of
  `a`, columns of `b`) that the operand's head labels covered;
- refuses (pins) what it cannot express: labels on the contracted dim that are not per head,
  broadcast batch dims, a head count only one operand can change, and a `view`/`reshape`
  that spells the head count (or the merged width) as a number, since the pruned model would
  then fail to run; `-1` there lets heads go (as Hugging Face's attention writes it).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch.fx import Node

from prunekit.structured.labels import Entry, Labels, make_entry
from prunekit.structured.ops.rules import OpContext, args_of, norm_dim, register_op_rule
from prunekit.structured.ops.shape import reshape_groups

aten = torch.ops.aten

_VIEWS = (aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.unflatten.int)
_SAME = (aten.clone.default, aten.contiguous.default, aten.alias.default, aten._to_copy.default)
_PERMUTES = (aten.transpose.int, aten.permute.default, aten.swapaxes.default)


def _order(node: Node) -> list[int]:
    """A permute's dim order: output dim i is input dim order[i]."""
    rank = len(node.meta["val"].shape)
    if node.target is aten.permute.default:
        return [norm_dim(d, rank) for d in args_of(node)[1]]
    order = list(range(rank))
    a, b = norm_dim(args_of(node)[1], rank), norm_dim(args_of(node)[2], rank)
    order[a], order[b] = order[b], order[a]
    return order


def _head_dims(ids: np.ndarray) -> set[int]:
    """Dims along which the head id changes: the ones a head's removal shrinks."""
    return {d for d in range(ids.ndim) if ids.shape[d] > 1 and bool(np.any(np.diff(ids, axis=d)))}


def _spelled_sizes(view: Node, rank: int) -> list[Any]:
    """The sizes a view op spells per output dim (None where it spells none)."""
    if view.target is aten.unflatten.int:
        sizes = list(args_of(view)[2])
        dim = norm_dim(args_of(view)[1], rank - len(sizes) + 1)
        return [None] * dim + sizes + [None] * (rank - dim - len(sizes))
    return list(args_of(view)[1])


def _view_fixes_heads(view: Node, ids_src: np.ndarray, ids_dst: np.ndarray) -> bool:
    """Whether `view` spells every size of a run of dims that holds heads (no -1 to absorb fewer)."""
    sizes = _spelled_sizes(view, ids_dst.ndim)
    src_heads, dst_heads = _head_dims(ids_src), _head_dims(ids_dst)
    for g_src, g_dst in reshape_groups(ids_src.shape, ids_dst.shape) or []:
        if (set(g_src) & src_heads or set(g_dst) & dst_heads) and all(
            isinstance(sizes[d], int) and sizes[d] != -1 for d in g_dst
        ):
            return True
    return False


def _fixed_upstream(node: Any, ids: np.ndarray) -> Node | None:
    """A view upstream of `node` (over permutes and views) that spells its head count, if any.

    `ids` is the head id of every element of `node` (shapes here are the example's, so small).
    """
    while isinstance(node, Node) and node.op == "call_function":
        if node.target in _PERMUTES:
            ids = np.transpose(ids, np.argsort(_order(node)))
        elif node.target in _VIEWS:
            before = ids.reshape(tuple(args_of(node)[0].meta["val"].shape))
            if _view_fixes_heads(node, before, ids):
                return node
            ids = before
        elif node.target not in _SAME:
            return None
        node = args_of(node)[0]
    return None


def _fixed_downstream(node: Node, ids: np.ndarray) -> Node | None:
    """A view downstream of `node` (over permutes and views) that spells its head count, if any."""
    for user in node.users:
        if user.op != "call_function" or args_of(user)[0] is not node:
            continue
        found = None
        if user.target in _PERMUTES:
            found = _fixed_downstream(user, np.transpose(ids, _order(user)))
        elif user.target in _SAME:
            found = _fixed_downstream(user, ids)
        elif user.target in _VIEWS:
            after = ids.reshape(tuple(user.meta["val"].shape))
            found = user if _view_fixes_heads(user, ids, after) else _fixed_downstream(user, after)
        if found is not None:
            return found
    return None


def _head_ids(shape: tuple[int, ...], bdims: list[int], heads: np.ndarray) -> np.ndarray:
    """The head (atom) of every element of a tensor of `shape` whose `bdims` carry `heads`.

    Atoms, not positions: with (batch * heads) merged into one dim, batch rows share atoms.
    """
    ids = heads.reshape([shape[d] if d in bdims else 1 for d in range(len(shape))])
    return np.broadcast_to(ids, shape)


def _collapse(ctx: OpContext, e: Entry, batch: int) -> tuple[list[int], np.ndarray]:
    """One atom per position of `e`'s batch dims (< batch): all its other positions unioned."""
    bdims = [d for d in e.dims if d < batch]
    axes = [e.axis(d) for d in bdims]
    arr = np.moveaxis(e.atoms, axes, list(range(len(axes))))
    lead = arr.shape[: len(axes)]
    rows = arr.reshape(int(np.prod(lead)), -1)
    ctx.atoms.union(rows, rows[:, :1])
    return bdims, rows[:, 0].reshape(lead)


@register_op_rule(aten.matmul.default, aten.bmm.default)
def matmul(ctx: OpContext, node: Node) -> Labels:
    """`a @ b` of two activations with batch dims: heads coupled across a and b (see module doc)."""
    a, b = args_of(node)[:2]
    sa, sb, so = ctx.shape(a), ctx.shape(b), ctx.shape(node)
    la, lb = ctx.labels(a), ctx.labels(b)

    def refuse() -> Labels:
        for e in la + lb:
            ctx.atoms.pin_all(e)
        return []

    if sa is None or sb is None or so is None or len(sa) != len(sb) or len(sa) < 3 or sa[:-2] != sb[:-2]:
        return refuse()
    if ctx.param_fqn(a) is not None or ctx.param_fqn(b) is not None:
        return refuse()  # a weight used as a matmul operand: no layer handler would slice it
    rank, batch = len(so), len(so) - 2
    out: Labels = []
    heads: list[tuple[list[int], np.ndarray, int | None]] = []
    for labels, free, contract, out_free in ((la, rank - 2, rank - 1, rank - 2), (lb, rank - 1, rank - 2, rank - 1)):
        per_head = [e for e in labels if any(d < batch for d in e.dims)]
        if len(per_head) > 1:
            return refuse()
        for e in labels:
            if e in per_head:
                continue
            if contract in e.dims:  # per-channel coupling across the contraction: not expressed here
                ctx.atoms.pin_all(e)
            else:
                out.append(Entry((out_free,), e.atoms))
        if per_head:
            bdims, atoms = _collapse(ctx, per_head[0], batch)
            heads.append((bdims, atoms, out_free if free in per_head[0].dims else None))
    if not heads:
        return out
    if len(heads) == 1 or heads[0][0] != heads[1][0]:  # only one operand could lose the head
        for _, atoms, _ in heads:
            ctx.atoms.freeze(atoms)
        return out
    (bdims, ha, fa), (_, hb, fb) = heads
    ctx.atoms.union(ha, hb)
    try:
        fixed = _fixed_upstream(a, _head_ids(sa, bdims, ha)) or _fixed_upstream(b, _head_ids(sb, bdims, ha))
        fixed = fixed or _fixed_downstream(node, _head_ids(so, bdims, ha))
    except (KeyError, TypeError, ValueError, AttributeError, IndexError):  # symbolic or missing shapes
        fixed = node
    if fixed is not None:
        return _freeze_fixed(ctx, fixed, ha, out)
    ctx.atoms.heads.append(ha.reshape(-1))
    dims = bdims + [d for d in (fa, fb) if d is not None]
    sizes = [so[d] for d in dims]
    arr = np.broadcast_to(ha.reshape(ha.shape + (1,) * (len(dims) - len(bdims))), sizes)
    for e in [e for e in out if e.dims[0] in dims]:  # a per-row label where heads are: keep both sizes
        ctx.atoms.pin_all(e)
        out.remove(e)
    return out + [make_entry(dims, np.ascontiguousarray(arr))]


def _freeze_fixed(ctx: OpContext, view: Node, heads: np.ndarray, out: Labels) -> Labels:
    if view.target in _VIEWS:
        why = f"{view.target} with sizes {list(args_of(view)[-1])} fixes the head count; write -1 there to let heads go"
    else:
        why = f"{view.target}: the views around it could not be checked (symbolic shapes?)"
    reason, ctx.atoms.reason = ctx.atoms.reason, why
    ctx.atoms.freeze(heads)
    ctx.atoms.reason = reason
    return out
