"""The op-rule table: how each ATen op moves channel labels and which channels it couples.

`rules.py` holds the table and what rules share; `tensor.py` (element-wise ops, concatenation,
layers with parameters), `shape.py` (views, reductions, pooling), `attention.py` (scaled dot-product
attention), `matmul.py` (activation @ activation, i.e. eager attention) and `recurrent.py`
(LSTM, GRU, RNN) register the rules. Importing this package imports all of them, so `get_op_rule` sees the full table.
"""

from __future__ import annotations

from prunekit.structured.ops import attention, matmul, recurrent, shape, tensor  # noqa: F401  (importing registers the rules)
from prunekit.structured.ops.rules import OpContext, args_of, get_op_rule, kwarg, list_op_rules, register_op_rule

__all__ = ["OpContext", "args_of", "get_op_rule", "kwarg", "list_op_rules", "register_op_rule"]
