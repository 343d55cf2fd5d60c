"""Coupled channel groups from a traced graph (Torch-Pruning's dependency graph, as data).

`analyze` walks the ATen graph once, applying the op-rule table (`ops/`) to move channel
labels forward and couple what must be removed together. Connected components of coupled
atoms are *units* (one channel, one neuron, one attention head with all its rows). Units
that touch exactly the same parameter dimensions form a `Group`: the thing a ratio applies
to and a criterion ranks. Units touching a frozen atom, an excluded layer's outputs, or a
parameter dimension no layer handler can shrink are not prunable.

An op without a rule is a barrier: nothing is pruned across it and one warning lists every
such op with its layer and source line. A rule may also refuse a known op (a split whose sizes
are numbers in the source, a layer whose weight is computed): a named barrier, listed with why.
"""

from __future__ import annotations

import logging
import warnings
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.fx import Node

from prunekit.structured.labels import AtomGraph, Entry, Labels
from prunekit.structured.layers import get_layer_handler, owner_of
from prunekit.structured.ops import get_op_rule
from prunekit.structured.source import location
from prunekit.structured.trace import TracedModel

aten = torch.ops.aten
log = logging.getLogger(__name__)
Member = tuple[str, int]  # (parameter/buffer FQN, dim)
_MULTI_OUTPUT = (aten.split.Tensor, aten.split_with_sizes.default, aten.chunk.default, aten.unbind.int)


@dataclass
class Group:
    """Coupled units that one ratio prunes: each unit removes `positions[m][u]` from member m.

    Attributes:
        members: parameter dims the group shrinks, e.g. ("conv1.weight", 0).
        positions: per member, per unit, the indices along that dim (a head has many rows).
        layers: FQNs of the layers whose outputs the group prunes (for printing and exclude).
    """

    members: list[Member]
    positions: dict[Member, list[np.ndarray]]
    layers: list[str]
    kind: str = "channel"  # or "head": units are attention heads
    units: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))  # atom component per unit

    @property
    def size(self) -> int:
        """Number of units (channels, neurons or heads)."""
        return len(next(iter(self.positions.values())))

    @property
    def name(self) -> str:
        names = self.layers or sorted({fqn.rpartition(".")[0] for fqn, _ in self.members})
        by_parent: dict[str, list[str]] = defaultdict(list)
        for n in names:
            parent, _, leaf = n.rpartition(".")
            by_parent[parent].append(leaf)
        parts = [
            (f"{p}." if p else "") + (leaves[0] if len(leaves) == 1 else "{" + ",".join(leaves) + "}")
            for p, leaves in by_parent.items()
        ]
        return ", ".join(parts[:3]) + (f" (+{len(parts) - 3})" if len(parts) > 3 else "")

    def __str__(self) -> str:
        width = min(len(self.positions[m][0]) for m in self.members)
        unit = "channels" if width == 1 else f"units of {width}"
        return f"Group[{self.name}]: {self.size} {unit} across {len(self.members)} tensors"


@dataclass
class DependencyGraph:
    """The result of `analyze`: prunable groups, and what could not be pruned and why."""

    groups: list[Group]
    sizes: dict[str, tuple[int, ...]]
    barriers: list[tuple[str, str]] = field(default_factory=list)  # (unknown op and line, layer)
    explain_blocked: Callable[[], dict[str, list[str]]] = field(default=dict, repr=False)  # -> `blocked`
    refused: list[str] = field(default_factory=list)  # named barriers: op, line, layer and why
    spelled: dict[str, list[np.ndarray]] = field(default_factory=dict)  # node -> atoms its sizes fix
    components: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))  # per atom
    _blocked: dict[str, list[str]] | None = field(default=None, repr=False)

    @property
    def blocked(self) -> dict[str, list[str]]:
        """Layer FQN -> why none of its output channels can go. Worked out on first use: on a
        large model that takes longer than planning itself needs, and only reports read it."""
        if self._blocked is None:
            self._blocked = self.explain_blocked()
        return self._blocked

    def summary(self) -> str:
        """One line per prunable group, then the blocked layers (and why), then the barriers."""
        lines = [str(g) for g in self.groups] or ["no prunable groups"]
        lines += [f"blocked: {layer} ({'; '.join(why)})" for layer, why in self.blocked.items()]
        lines += [f"barrier: {op} in {layer or '<root>'!r}" for op, layer in self.barriers]
        lines += [f"barrier: {why}" for why in self.refused]
        return "\n".join(lines)

    def spelling_nodes(self, removed: list[np.ndarray]) -> list[str]:
        """Nodes that spell a size where `removed` (per group, unit indices) takes channels away."""
        gone = np.concatenate([g.units[r] for g, r in zip(self.groups, removed, strict=True)] + [np.zeros(0, np.int64)])
        out = []
        for name, arrays in self.spelled.items():
            atoms = np.concatenate([a.reshape(-1) for a in arrays])
            atoms = atoms[atoms >= 0]
            if np.isin(self.components[atoms], gone).any():
                out.append(name)
        return out

    def __str__(self) -> str:
        return self.summary()


class _Context:
    """Implements `ops.OpContext` over one traced graph."""

    def __init__(self, traced: TracedModel, tensors: dict[str, Tensor]) -> None:
        self.atoms = AtomGraph()
        self.traced = traced
        self.tensors = tensors
        self.env: dict[Node, Any] = {}
        self.refused: list[str] = []
        self.spelled: dict[str, list[np.ndarray]] = {}

    def barrier(self, node: Node, why: str) -> Labels:
        layer = TracedModel.layer_of(node)
        where = location(node)
        text = f"{_op_name(node.target)}{f' at {where}' if where else ''} in {layer or '<root>'!r}: {why}"
        reason, self.atoms.reason = self.atoms.reason, text
        touched = False
        for arg in node.all_input_nodes:
            labels = self.labels(arg)
            _freeze_labels(self, labels)
            touched = touched or any((e.atoms >= 0).any() for e in _flat(labels))
        self.atoms.reason = reason
        if touched and text not in self.refused:
            self.refused.append(text)
        return []

    def spells_sizes(self, node: Node, atoms: list[np.ndarray]) -> None:
        if atoms:
            self.spelled.setdefault(node.name, []).extend(atoms)

    def shape(self, arg: Any) -> tuple[int, ...] | None:
        val = arg.meta.get("val") if isinstance(arg, Node) else None
        shape = getattr(val, "shape", None)
        if shape is None:
            return None
        try:
            return tuple(int(s) for s in shape)
        except TypeError:  # symbolic sizes: treat as unknown
            return None

    def param_fqn(self, arg: Any) -> str | None:
        if isinstance(arg, Node) and arg.op == "placeholder":
            return self.traced.tensor_of.get(arg.name)
        return None

    def labels(self, arg: Any) -> Labels:
        if not isinstance(arg, Node):
            return []
        fqn = self.param_fqn(arg)
        if fqn is not None:  # parameters get atoms lazily, for each dim that is not 1
            shape = self.shape(arg) or ()
            return [Entry((d,), self.atoms.param(fqn, d, n)) for d, n in enumerate(shape) if n > 1]
        return self.env.get(arg, [])


def analyze(
    model: nn.Module,
    traced: TracedModel,
    exclude: list[str] | None = None,
    *,
    fixed: dict[str, str] | None = None,
    warn: bool = True,
) -> DependencyGraph:
    """Find the prunable channel groups of `model` from its traced graph (no mutation).

    Args:
        model: the model that was traced (its modules own the parameters the graph names).
        traced: `trace(model, example_inputs)`.
        exclude: layer FQNs whose output channels must stay (their inputs may still shrink).
        fixed: graph node name -> why it is a barrier although its op has a rule (the
            planner's second pass after a pruned model failed to run).
        warn: warn about barriers now (else the caller calls `warn_barriers` on the result).

    Returns:
        A `DependencyGraph`.
    """
    tensors = dict(model.named_parameters()) | dict(model.named_buffers())
    ctx = _Context(traced, tensors)
    barriers: list[tuple[str, str]] = []
    for node in traced.graph.nodes:
        if node.op == "placeholder":
            continue  # model inputs carry no labels: whatever they feed cannot shrink
        layer = TracedModel.layer_of(node)
        ctx.atoms.reason = f"{_op_name(node.target)} in {layer or '<root>'!r}"
        if node.op == "output":
            ctx.atoms.reason = "feeds the model output"
            for arg in node.all_input_nodes:
                _freeze_labels(ctx, ctx.env.get(arg, []))
            continue
        if node.op != "call_function":
            continue
        rule = get_op_rule(node.target)
        if fixed and node.name in fixed:
            ctx.env[node] = _fixed_barrier(ctx, node, fixed[node.name])
        elif rule is None:
            ctx.atoms.reason = f"op {_op_name(node.target)} in {layer or '<root>'!r} is unknown (a barrier)"
            ctx.env[node] = _barrier(ctx, node, barriers)
        else:
            ctx.env[node] = rule(ctx, node)
    ctx.atoms.enforce_rectangular()
    groups, comp, explain = _groups(model, ctx.atoms, exclude or [])
    sizes = {fqn: tuple(t.shape) for fqn, t in tensors.items()}
    graph = DependencyGraph(groups, sizes, barriers, explain, ctx.refused, ctx.spelled, comp)
    if warn:
        warn_barriers(graph)
    return graph


def warn_barriers(graph: DependencyGraph) -> None:
    """One warning listing the unknown ops, one listing the refused (named) barriers, if any."""
    barriers, refused = graph.barriers, graph.refused
    if barriers:
        listed = "; ".join(f"{op} in {layer or '<root>'!r}" for op, layer in barriers)
        warnings.warn(
            f"structured pruning treats ops it does not know as barriers (nothing is pruned across them): {listed}",
            stacklevel=3,
        )
    if refused:
        warnings.warn(
            "structured pruning keeps the channels these ops fix (barriers: nothing is pruned across them): "
            + "; ".join(refused),
            stacklevel=3,
        )


def _fixed_barrier(ctx: _Context, node: Node, why: str) -> Any:
    ctx.barrier(node, why)
    if node.target in _MULTI_OUTPUT:
        return [[] for _ in node.meta.get("val") or ()]
    return []


def _op_name(target: Any) -> str:
    return str(target).removeprefix("aten.").removesuffix(".default")


def _flat(labels: Any) -> list[Any]:
    return [e for item in labels for e in (_flat(item) if isinstance(item, list) else [item])]


def _freeze_labels(ctx: _Context, labels: Any) -> None:
    for item in labels:
        if isinstance(item, list):
            _freeze_labels(ctx, item)
        else:
            ctx.atoms.freeze(item.atoms)


def _barrier(ctx: _Context, node: Node, barriers: list[tuple[str, str]]) -> Labels:
    touched = False
    for arg in node.all_input_nodes:
        labels = ctx.labels(arg)
        _freeze_labels(ctx, labels)
        if ctx.param_fqn(arg) is None and any(
            (e.atoms >= 0).any() for item in labels for e in (item if isinstance(item, list) else [item])
        ):
            touched = True
    if touched:
        where = location(node)
        entry = (f"{node.target}{f' at {where}' if where else ''}", TracedModel.layer_of(node))
        if entry not in barriers:
            barriers.append(entry)
    return []


def _groups(
    model: nn.Module, atoms: AtomGraph, exclude: list[str]
) -> tuple[list[Group], np.ndarray, Callable[[], dict[str, list[str]]]]:
    comp, graph_frozen = atoms.components()
    frozen = graph_frozen.copy()
    head_comps = set(comp[np.concatenate(atoms.heads)].tolist()) if atoms.heads else set()
    modules = dict(model.named_modules())
    outputs: list[tuple[str, np.ndarray]] = []  # (layer, output-dim atoms) for `blocked`
    # Positions no layer handler can shrink, and excluded layers' outputs, freeze their units.
    held: dict[int, str] = {}
    for (fqn, dim), arr in atoms.params.items():
        layer, name = owner_of(fqn)
        module = modules.get(layer)
        handler = get_layer_handler(module) if module is not None else None
        shrinkable = handler.shrinkable(module).get(name, ()) if handler is not None else ()
        is_output = handler is not None and handler.outputs(module).get(name) == dim
        if is_output:
            outputs.append((layer, arr))
        if dim not in shrinkable or (is_output and layer in exclude):
            frozen[comp[arr]] = True
            why = "excluded" if dim in shrinkable else f"{fqn} dim {dim} cannot shrink ({type(module).__name__})"
            for c in set(comp[arr].tolist()):
                held.setdefault(c, why)

    def explain() -> dict[str, list[str]]:
        return _explain_blocked(atoms, comp, graph_frozen, frozen, held, outputs)
    keys = list(atoms.params)
    comps, mems, poss = [np.zeros(0, np.int64)], [np.zeros(0, np.int64)], [np.zeros(0, np.int64)]
    for k, arr in enumerate(atoms.params.values()):
        ids = comp[arr]
        idx = np.flatnonzero(~frozen[ids])
        comps.append(ids[idx])
        mems.append(np.full(idx.size, k, dtype=np.int64))
        poss.append(idx)
    c, m, p = np.concatenate(comps), np.concatenate(mems), np.concatenate(poss)
    if c.size == 0:
        return [], comp, explain
    order_ = np.lexsort((p, m, c))  # by unit, then member, then position (vectorised: ~1e5 positions)
    c, m, p = c[order_], m[order_], p[order_]
    cuts = np.flatnonzero((np.diff(c) != 0) | (np.diff(m) != 0)) + 1
    starts, ends = np.concatenate([[0], cuts]), np.concatenate([cuts, [c.size]])
    pair_c, pair_m = c[starts], m[starts]
    ucuts = np.flatnonzero(np.diff(pair_c) != 0) + 1
    ustarts, uends = np.concatenate([[0], ucuts]), np.concatenate([ucuts, [pair_c.size]])
    by_signature: dict[tuple[int, ...], list[int]] = defaultdict(list)
    for u in range(ustarts.size):
        by_signature[tuple(pair_m[ustarts[u] : uends[u]].tolist())].append(u)
    groups = []
    for signature, unit_list in by_signature.items():
        kind = "head" if int(pair_c[ustarts[unit_list[0]]]) in head_comps else "channel"
        unit_list.sort(key=lambda u: int(p[starts[ustarts[u]]]))
        members = [keys[k] for k in signature]
        positions = {
            member: [p[starts[ustarts[u] + j] : ends[ustarts[u] + j]] for u in unit_list]
            for j, member in enumerate(members)
        }
        layers = sorted(
            {
                owner_of(fqn)[0]
                for fqn, dim in members
                if (h := get_layer_handler(modules.get(owner_of(fqn)[0])))
                and h.outputs(modules[owner_of(fqn)[0]]).get(owner_of(fqn)[1]) == dim
            }
        )
        units = np.array([int(pair_c[ustarts[u]]) for u in unit_list], dtype=np.int64)
        groups.append(Group(members, positions, layers, kind, units))
    order = {fqn: i for i, fqn in enumerate(modules)}
    groups.sort(key=lambda g: min(order.get(owner_of(fqn)[0], 0) for fqn, _ in g.members))
    return groups, comp, explain


def _explain_blocked(
    atoms: AtomGraph,
    comp: np.ndarray,
    graph_frozen: np.ndarray,
    frozen: np.ndarray,
    held: dict[int, str],
    outputs: list[tuple[str, np.ndarray]],
) -> dict[str, list[str]]:
    """The layers none of whose output channels can go, and why."""
    stuck = [(layer, set(comp[arr].tolist())) for layer, arr in outputs if frozen[comp[arr]].all()]
    wanted = {c for _, comps in stuck for c in comps if graph_frozen[c]}
    reasons = atoms.frozen_by(comp, wanted) if wanted else {}
    blocked: dict[str, list[str]] = {}
    for layer, comps in stuck:
        why: list[str] = []
        for c in sorted(comps):
            for r in ([held[c]] if c in held else []) + reasons.get(c, []):
                if r and r not in why:
                    why.append(r)
        blocked[layer] = why[:3] + ([f"+{len(why) - 3} more"] if len(why) > 3 else []) or ["frozen"]
    return blocked
