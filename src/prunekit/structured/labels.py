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
        out: dict[int, list[str]] = {}
        wanted = np.fromiter(components, dtype=np.int64)
        for atoms, why in zip(self._frozen, self._why, strict=True):
            for c in np.intersect1d(comp[atoms], wanted).tolist():
                if why not in out.setdefault(c, []):
                    out[c].append(why)
        return out
