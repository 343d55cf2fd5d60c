"""Progress bars on long work (calibration, scans, fine-tuning), off unless asked for.

Under torchrun only rank 0 draws a bar: N ranks writing to one terminal is noise.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, TypeVar

import torch.distributed as dist

T = TypeVar("T")


def progress(items: Iterable[T], desc: str, enabled: bool, **tqdm_kwargs: Any) -> Iterable[T]:
    """`items`, wrapped in a tqdm bar labelled `desc` when `enabled` (tqdm loads only then)."""
    if not enabled or (dist.is_available() and dist.is_initialized() and dist.get_rank() != 0):
        return items
    from tqdm.auto import tqdm

    return tqdm(items, desc=desc, **{"leave": False, **tqdm_kwargs})
