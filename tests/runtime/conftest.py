"""Fixtures for the runtime tests."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from prunekit._registry import Registry
from prunekit.runtime import candidates as cand


@pytest.fixture
def extra_candidate(monkeypatch: pytest.MonkeyPatch) -> Callable[[str, cand.Builder], None]:
    """`extra_candidate(name, builder)`: a candidate registered for this test only.

    The test sees a copy of `candidates.CANDIDATES` with the builder added; the real table is
    never touched, so nothing leaks into later tests.
    """

    def add(name: str, builder: cand.Builder) -> None:
        registry: Registry[str, cand.Builder] = Registry(cand.CANDIDATES.what)
        for key, entry in cand.CANDIDATES.items():
            registry.register(key, entry)
        registry.register(name, builder)
        monkeypatch.setattr(cand, "CANDIDATES", registry)

    return add
