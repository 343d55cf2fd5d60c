"""Op rule for `scaled_dot_product_attention`: heads are the unit (see `rules.py` for the table).

A head is removed whole: its rows in q, k and v (and, through the output's labels, its columns
in the output projection); a query head follows the key/value head it reads (grouped-query
attention); a per-head additive mask (Swin's relative position bias) loses the same heads.
Hand-written attention (`q @ k^T`, softmax, `@ v`) is `matmul.py`'s.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch.fx import Node

from prunekit.structured.labels import Entry, Labels, entry_on
from prunekit.structured.ops.rules import OpContext, args_of, kwarg, register_op_rule

aten = torch.ops.aten


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


def _mask_heads(ctx: OpContext, mask: Any, hq: np.ndarray | None, rank: int) -> None:
    """A per-head additive mask (Swin's relative position bias) loses the heads q loses.

    A mask with one row per head that no parameter backs (a constant per head) keeps the heads.
    """
    if not isinstance(mask, Node):
        return
    shape = ctx.shape(mask) or ()
    labels = ctx.labels(mask)
    at = len(shape) - 3  # the head dim, right-aligned with (batch, heads, q, k)
    per_head = at >= 0 and shape[at] > 1 and hq is not None and shape[at] == len(hq)
    e = entry_on(labels, at) if per_head else None
    for other in labels:
        if other is not e:
            ctx.atoms.pin_all(other)
    if e is not None and hq is not None:
        rows = np.moveaxis(e.atoms, e.axis(at), 0).reshape(e.atoms.shape[e.axis(at)], -1)
        ctx.atoms.union(rows, rows[:, :1])
        ctx.atoms.union(rows[:, 0], hq)
    elif at >= 0 and shape[at] > 1 and hq is not None:
        ctx.atoms.freeze(hq)


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
    mask = args_of(node)[3] if len(args_of(node)) > 3 else kwarg(node, "attn_mask", None)
    if any(h is None for h in heads):
        for h in heads:
            if h is not None:
                ctx.atoms.freeze(h)
        _mask_heads(ctx, mask, None, rank)
        return []
    hq, hk, hv = heads
    assert hq is not None and hk is not None and hv is not None
    _mask_heads(ctx, mask, hq, rank)
    group = len(hq) // max(len(hk), 1)
    ctx.atoms.union(hq, np.repeat(hk, group))
    ctx.atoms.union(hq, np.repeat(hv, group))
    out = ctx.shape(node) or ()
    arr = np.broadcast_to(hq[:, None], (len(hq), out[-1]))
    return [Entry((head_dim, rank - 1), np.ascontiguousarray(arr))]
