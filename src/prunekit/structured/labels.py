"""Channel labels: which parameter rows/columns each element of an activation depends on.

Every prunable position of a parameter dimension (a row of a Linear weight, a channel of a
BatchNorm) is an *atom*, an integer. An activation carries `Entry`s: for a set of its
dimensions, an integer array giving the atom behind each position (-1: a fixed position no
parameter can remove). Ops union atoms that must be removed together (both operands of a
residual add), and *freeze* atoms that must never be removed (model outputs, a mean over
channels). Connected components of the union graph are the removable units: one channel of
a coupled group, or one attention head with all its rows in q, k, v and o.

Per-element labels (rather than one label per dimension) are what make reshapes exact:
splitting 384 features into 12 heads of 32, flattening C x 4 x 4 into a Linear, or
repeating key/value heads for grouped-query attention are all plain array reshapes.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass(eq=False)
class Entry:
    """Atoms behind the positions of `dims` (sorted) of one activation; shape = their sizes."""

    dims: tuple[int, ...]
    atoms: np.ndarray

    def axis(self, dim: int) -> int:
        return self.dims.index(dim)


Labels = list[Entry]


def make_entry(dims: tuple[int, ...] | list[int], atoms: np.ndarray) -> Entry:
    """An `Entry` with its dims sorted (atoms transposed to match)."""
    order = sorted(range(len(dims)), key=lambda i: dims[i])
    return Entry(tuple(dims[i] for i in order), np.ascontiguousarray(np.transpose(atoms, order)))


def entry_on(labels: Labels, dim: int) -> Entry | None:
    """The entry of `labels` covering `dim`, if any."""
    return next((e for e in labels if dim in e.dims), None)


@dataclass
class AtomGraph:
    """Atoms, the unions between them, the frozen ones, and the parameter dims they live in."""

    count: int = 0
    _left: list[np.ndarray] = field(default_factory=list)
    _right: list[np.ndarray] = field(default_factory=list)
    _frozen: list[np.ndarray] = field(default_factory=list)
    params: dict[tuple[str, int], np.ndarray] = field(default_factory=dict)
    heads: list[np.ndarray] = field(default_factory=list)  # one atom per attention head
    reason: str = ""  # what is being analysed now; recorded with each freeze (for `blocked`)
    _why: list[str] = field(default_factory=list)  # parallel to _frozen
    _slices: list[tuple[np.ndarray, int, int]] = field(default_factory=list)  # see `keep_rectangular`

    def new(self, shape: tuple[int, ...] | int) -> np.ndarray:
        """Fresh atoms shaped `shape`."""
        size = int(np.prod(shape))
        atoms = np.arange(self.count, self.count + size, dtype=np.int64).reshape(shape)
        self.count += size
        return atoms

    def param(self, fqn: str, dim: int, size: int) -> np.ndarray:
        """The atoms of dimension `dim` of parameter/buffer `fqn`, created on first use."""
        key = (fqn, dim)
        if key not in self.params:
            self.params[key] = self.new(size)
        return self.params[key]

    def union(self, a: np.ndarray, b: np.ndarray) -> None:
        """Couple `a` and `b` element-wise (broadcast); an atom paired with -1 is frozen."""
        a, b = np.broadcast_arrays(np.asarray(a), np.asarray(b))
        a, b = a.reshape(-1), b.reshape(-1)
        both = (a >= 0) & (b >= 0)
        self._left.append(a[both])
        self._right.append(b[both])
        self.freeze(a[(a >= 0) & (b < 0)])
        self.freeze(b[(b >= 0) & (a < 0)])

    def freeze(self, atoms: np.ndarray) -> None:
        """Never remove these atoms (nor anything coupled to them)."""
        flat = np.asarray(atoms).reshape(-1)
        self._frozen.append(flat[flat >= 0])
        self._why.append(self.reason)

    def pin(self, entry: Entry, axis: int) -> None:
        """Keep the size of `entry`'s `axis`: pruning may remove whole slices along other axes only.

        A one-axis entry has no other axis, so it is frozen.
        """
        if entry.atoms.ndim == 1:
            self.freeze(entry.atoms)
            return
        first = np.take(entry.atoms, [0], axis=axis)
        self.union(entry.atoms, first)

    def pin_all(self, entry: Entry) -> None:
        """Freeze every atom of `entry`."""
        self.freeze(entry.atoms)

    def keep_rectangular(self, atoms: np.ndarray, free: int, ndim: int) -> None:
        """Whatever is removed from the grid over `atoms`' first `ndim` axes must be whole slices.

        A channel dim split into (groups, per group), as a channel shuffle does, must lose the
        same positions in every group, or the pruned tensor is no longer a grid. Checked once
        every rule has run (`enforce_rectangular`): if no other op (attention's whole heads)
        made it so, those axes other than `free` are pinned, so only `free` shrinks. Further
        axes (other dims of the same entry) ride along with each grid position.
        """
        if ndim > 1:
            self._slices.append((atoms, free, ndim))

    def enforce_rectangular(self) -> None:
        """Pin the axes of every `keep_rectangular` grid that could still lose partial slices."""
        if not self._slices:
            return
        comp, frozen = self.components()
        for atoms, free, ndim in self._slices:
            if not _rectangular(atoms, ndim, comp, frozen):
                for axis in range(ndim):
                    if axis != free:
                        self.union(atoms, np.take(atoms, [0], axis=axis))
        self._slices.clear()

    def components(self) -> tuple[np.ndarray, np.ndarray]:
        """Component id of every atom, and a bool per component: frozen or not."""
        comp = np.arange(self.count, dtype=np.int64)
        if self._left:
            left, right = np.concatenate(self._left), np.concatenate(self._right)
            # Label propagation with pointer jumping: each round every edge pulls both ends to
            # the smaller id; converges in a few rounds on these sparse, shallow graphs.
            while True:
                low = np.minimum(comp[left], comp[right])
                before = comp.copy()
                np.minimum.at(comp, left, low)
                np.minimum.at(comp, right, low)
                comp = comp[comp]
                comp = comp[comp]
                if np.array_equal(before, comp):
                    break
        frozen = np.zeros(self.count, dtype=bool)
        if self._frozen:
            frozen[comp[np.concatenate(self._frozen)]] = True
        return comp, frozen

    def frozen_by(self, comp: np.ndarray, components: set[int]) -> dict[int, list[str]]:
        """For each of `components` (ids from `components()`), the distinct reasons it was frozen."""
        if not self._frozen or not components:
            return {}
        wanted = np.fromiter(components, dtype=np.int64)
        ids = comp[np.concatenate(self._frozen)]
        which = np.repeat(np.arange(len(self._frozen)), [a.size for a in self._frozen])
        hit = np.isin(ids, wanted)
        # One pass over every frozen atom (a large model freezes thousands of arrays); sorted by
        # component, then by freeze order, so each component lists its reasons as they came.
        pairs = np.unique(np.stack([ids[hit], which[hit]]), axis=1)
        out: dict[int, list[str]] = {}
        for c, w in pairs.T.tolist():
            reasons = out.setdefault(c, [])
            if self._why[w] not in reasons:
                reasons.append(self._why[w])
        return out


def _rectangular(atoms: np.ndarray, ndim: int, comp: np.ndarray, frozen: np.ndarray) -> bool:
    """Whether, along one of the first `ndim` axes, every slice is one unit or cannot be removed."""
    ids = np.where(atoms >= 0, comp[np.maximum(atoms, 0)], -1)
    fixed = (atoms < 0) | frozen[np.maximum(ids, 0)]
    for axis in range(ndim):
        rows = np.moveaxis(ids, axis, 0).reshape(atoms.shape[axis], -1)
        stuck = np.moveaxis(fixed, axis, 0).reshape(atoms.shape[axis], -1)
        one_unit = (rows == rows[:, :1]).all(axis=1) & ~stuck.any(axis=1)
        if (one_unit | stuck.all(axis=1)).all():
            return True
    return False
