"""One registry shape for every extension point (timm's `_registry.py`): register, get, find, names.

Methods, criteria, calibration solvers, group criteria, layer handlers, op rules and kernel
candidates each keep one `Registry` beside their code. A duplicate registration and an
unknown name both fail with a `ConfigError` that says which table and, for a miss, what is known.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterator
from typing import Generic, TypeVar, cast

from prunekit.errors import ConfigError

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")
T = TypeVar("T")


def _name(key: object) -> str:
    return key.__name__ if isinstance(key, type) else str(key)


class Registry(Generic[K, V]):
    """Entries of one extension point keyed by name (or by type, shown by its `__name__`).

    Args:
        what: what one entry is, for messages ("pruning method", "criterion").

    Example:
        >>> solvers: Registry[str, int] = Registry("solver")
        >>> solvers.register("wanda", 1)
        1
        >>> solvers.get("sparsegpt")
        Traceback (most recent call last):
        prunekit.errors.ConfigError: unknown solver 'sparsegpt'; known: wanda
    """

    def __init__(self, what: str) -> None:
        self.what = what
        self._entries: dict[K, V] = {}

    def register(self, key: K, entry: V) -> V:
        """Add `entry` under `key` and return it; a key registers once."""
        if key in self._entries:
            raise ConfigError(f"{self.what} {_name(key)!r} is already registered")
        self._entries[key] = entry
        return entry

    def decorator(self, key: K, make: Callable[[T], V] | None = None) -> Callable[[T], T]:
        """`@registry.decorator(key)`: register the decorated object (or `make(obj)`) and return it unchanged."""

        def wrap(obj: T) -> T:
            self.register(key, make(obj) if make is not None else cast(V, obj))
            return obj

        return wrap

    def get(self, key: K) -> V:
        """The entry under `key`; a miss raises `ConfigError` listing the known names."""
        try:
            return self._entries[key]
        except KeyError:
            known = ", ".join(self.names()) or "none"
            raise ConfigError(f"unknown {self.what} {_name(key)!r}; known: {known}") from None

    def find(self, key: K) -> V | None:
        """The entry under `key`, or None: for lookups where a miss is an answer, not an error."""
        return self._entries.get(key)

    def names(self) -> list[str]:
        """The registered keys' names, sorted."""
        return sorted(_name(k) for k in self._entries)

    def items(self) -> list[tuple[K, V]]:
        """(key, entry) pairs in registration order."""
        return list(self._entries.items())

    def __contains__(self, key: object) -> bool:
        return key in self._entries

    def __iter__(self) -> Iterator[K]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)
