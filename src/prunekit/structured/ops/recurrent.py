"""Op rule for recurrent layers: `nn.LSTM`, `nn.GRU` and `nn.RNN` (see `rules.py` for the table).

A hidden unit j of a recurrent layer owns row j of every gate block of `weight_ih`, `weight_hh`
and the biases (LSTM gates i, f, g, o; GRU r, z, n), column j of `weight_hh` (its own
recurrence) and column j of the next layer's `weight_ih` (per direction). `nn.LSTM` keeps one
`hidden_size` for all layers and directions, so unit j is removed from every layer and
direction at once: one atom per unit index. The output's last dim is the last layer's units
(both directions concatenated), h_n / c_n carry them on dim 2.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch.fx import Node

from prunekit.structured.labels import Entry, Labels, entry_on
from prunekit.structured.ops.rules import OpContext, args_of, register_op_rule

aten = torch.ops.aten

_GATES: dict[Any, int] = {aten.lstm.input: 4, aten.gru.input: 3, aten.rnn_tanh.input: 1, aten.rnn_relu.input: 1}
# Initial states the layer builds itself (`torch.zeros(..., hidden_size)`) follow `hidden_size`.
_OWN_STATE = (aten.zeros.default, aten.new_zeros.default, aten.zeros_like.default)


def _atoms(ctx: OpContext, param: Any, dim: int) -> np.ndarray:
    fqn, shape = ctx.param_fqn(param), ctx.shape(param)
    assert fqn is not None and shape is not None  # checked by the rule
    return ctx.atoms.param(fqn, dim, shape[dim])


def _couple_input(ctx: OpContext, labels: Labels, dim: int, cols: np.ndarray) -> None:
    e = entry_on(labels, dim)
    for other in labels:
        if other is not e:
            ctx.atoms.pin_all(other)  # batch/time labels do not survive the recurrence
    if e is None:
        ctx.atoms.freeze(cols)
    elif len(e.dims) == 1:
        ctx.atoms.union(e.atoms, cols)
    else:
        ctx.atoms.pin_all(e)
        ctx.atoms.freeze(cols)


def _couple_state(ctx: OpContext, state: Any, unit: np.ndarray) -> None:
    """An initial state (layers * directions, batch, hidden) must lose the same units."""
    if not isinstance(state, Node):
        return
    labels = ctx.labels(state)
    e = entry_on(labels, 2)
    for other in labels:
        if other is not e:
            ctx.atoms.pin_all(other)
    if e is not None:
        rows = np.moveaxis(e.atoms, e.axis(2), 0).reshape(len(unit), -1)
        ctx.atoms.union(rows, unit[:, None])
    elif not (state.op == "call_function" and state.target in _OWN_STATE):
        ctx.atoms.freeze(unit)  # the caller's state has hidden_size units: they all stay


@register_op_rule(*_GATES)
def recurrent(ctx: OpContext, node: Node) -> list[Labels]:
    """LSTM/GRU/RNN: hidden units across gates, layers and directions (see module doc)."""
    args = args_of(node)
    x, hx, params = args[0], args[1], list(args[2])
    has_biases, layers, bidirectional = bool(args[3]), int(args[4]), bool(args[7])
    gates, dirs = _GATES[node.target], 2 if bidirectional else 1
    per = 4 if has_biases else 2
    outputs = 3 if node.target is aten.lstm.input else 2
    if len(params) != layers * dirs * per or any(ctx.param_fqn(p) is None for p in params):
        ctx.barrier(node, "its weights are not plain parameters (an LSTM projection, proj_size > 0?)")
        return [[] for _ in range(outputs)]
    hidden = (ctx.shape(params[1]) or (0, 0))[1]
    unit = _atoms(ctx, params[1], 1)  # weight_hh_l0's columns: one atom per unit index
    for k in range(layers * dirs):
        w_ih, w_hh, *biases = params[k * per : (k + 1) * per]
        for tensor in (w_ih, w_hh, *biases):
            ctx.atoms.union(_atoms(ctx, tensor, 0).reshape(gates, hidden), unit[None, :])
        ctx.atoms.union(_atoms(ctx, w_hh, 1), unit)
        cols = _atoms(ctx, w_ih, 1)
        if k < dirs:
            _couple_input(ctx, ctx.labels(x), len(ctx.shape(x) or ()) - 1, cols)
        else:
            ctx.atoms.union(cols.reshape(dirs, hidden), unit[None, :])
    for state in hx if isinstance(hx, (list, tuple)) else [hx]:
        _couple_state(ctx, state, unit)
    rank = len(ctx.shape(x) or ())
    out: list[Labels] = [[Entry((rank - 1,), np.tile(unit, dirs))]]
    return out + [[Entry((2,), unit.copy())] for _ in range(outputs - 1)]
