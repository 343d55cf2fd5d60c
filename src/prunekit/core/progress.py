"""Progress bars on long work (calibration, scans, fine-tuning), off unless asked for."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, TypeVar

T = TypeVar("T")


def progress(items: Iterable[T], desc: str, enabled: bool, **tqdm_kwargs: Any) -> Iterable[T]:
    """`items`, wrapped in a tqdm bar labelled `desc` when `enabled` (tqdm loads only then)."""
    if not enabled:
        return items
    from tqdm.auto import tqdm

    return tqdm(items, desc=desc, **{"leave": False, **tqdm_kwargs})
