"""The op-rule table and what every rule shares: `OpContext`, argument access, dim normalising.

A rule gets the node and an `OpContext` and returns the output's labels. Ops missing from the
table are barriers (see `groups.py`): their inputs are frozen and one warning names them.
Rules are registered with `register_op_rule(*targets)`; `get_op_rule`/`list_op_rules` look
them up. The rule modules (`tensor.py`, `shape.py`, `attention.py`, `matmul.py`,
`recurrent.py`) import this one, never each other's privates; `ops/__init__.py` imports them
all so that the table is complete.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

import numpy as np
from torch.fx import Node

from prunekit._registry import Registry
from prunekit.structured.labels import AtomGraph, Labels


class OpContext(Protocol):
    """What a rule may ask about the graph being analysed."""

    atoms: AtomGraph

    def labels(self, arg: Any) -> Labels: ...

    def shape(self, arg: Any) -> tuple[int, ...] | None: ...

    def param_fqn(self, arg: Any) -> str | None: ...

    def barrier(self, node: Node, why: str) -> Labels:
        """Make `node` a named barrier: freeze its inputs' labels, record `why`; returns []."""
        ...

    def spells_sizes(self, node: Node, atoms: list[np.ndarray]) -> None:
        """Note that `node` spells sizes (a view's or split's ints) where `atoms` lie.

        If the pruned model then fails to run, these nodes become barriers and planning
        runs again (`plan.py`): a number in the source cannot follow the pruned width.
        """
        ...


Rule = Callable[[OpContext, Node], Any]

OP_RULES: Registry[Any, Rule] = Registry("op rule")
"""ATen op (or `operator.getitem`) -> its rule."""


def register_op_rule(*targets: Any) -> Callable[[Rule], Rule]:
    """Decorator: use the decorated rule for every op in `targets` (each registers once)."""

    def wrap(fn: Rule) -> Rule:
        for target in targets:
            OP_RULES.register(target, fn)
        return fn

    return wrap


def get_op_rule(target: Any) -> Rule | None:
    """The rule for `target`, or None (the op is a barrier: a miss is an answer, not an error)."""
    return OP_RULES.find(target)


def list_op_rules() -> list[str]:
    """Names of the ops with a rule, sorted."""
    return OP_RULES.names()


def args_of(node: Node) -> Any:
    """`node.args`, untyped (fx types arguments as a wide union that rules narrow by position)."""
    return node.args


def kwarg(node: Node, name: str, default: Any) -> Any:
    """`node.kwargs[name]`, untyped like `args_of`."""
    return node.kwargs.get(name, default)


def norm_dim(d: int, rank: int) -> int:
    """A possibly negative dim (or index) `d` of a `rank`-sized range as its non-negative value."""
    return d + rank if d < 0 else d
