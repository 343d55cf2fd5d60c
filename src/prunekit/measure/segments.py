"""Accuracy by segment: a user's function (or list of names) maps each evaluation example to a
segment, and each segment gets its accuracy, agreement and paired change (per class is the default)."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import Tensor

from prunekit.errors import ConfigError
from prunekit.measure.noise import paired_change

Segments = Callable[[Tensor], object] | Sequence[str]


def segment_names(segments: Segments, data: Iterable[tuple[Tensor, Tensor]], examples: int) -> list[str]:
    """The segment name of each evaluation example, in `data`'s order; pure.

    Raises:
        ConfigError: a sequence whose length is not `examples`, or a function that fails on an
            example (named by its index in `data`).
    """
    if not callable(segments):
        names = [str(v) for v in segments]
        if isinstance(segments, str) or len(names) != examples:
            raise ConfigError(f"compare: segments names {len(names)} examples but the evaluation data has "
                              f"{examples}: give one name per example, in the data's order")
        return names
    names, index = [], 0
    label = getattr(segments, "__name__", type(segments).__name__)
    for x, _ in data:
        for row in x:
            try:
                names.append(str(segments(row)))
            except Exception as err:  # a user function: any failure is reported with its example
                raise ConfigError(f"compare: segments function {label!r} failed on example {index} "
                                  f"({type(err).__name__}: {err})") from err
            index += 1
    return names


def segment_block(names: Sequence[str], base_pred: Tensor, pruned_pred: Tensor, labels: Tensor) -> dict[str, Any]:
    """Accuracy, agreement and the paired accuracy change per segment, and the segments that dropped most; pure."""
    rows: list[dict[str, Any]] = []
    for name in sorted(set(names)):
        sel = torch.tensor([n == name for n in names])
        b, p = base_pred[sel] == labels[sel], pruned_pred[sel] == labels[sel]
        change = paired_change(b, p)
        rows.append({"segment": name, "count": int(sel.sum()), "baseline": float(b.float().mean()),
                     "pruned": float(p.float().mean()), "delta": change["points"] / 100,
                     "agreement": float((base_pred[sel] == pruned_pred[sel]).float().mean()),
                     "change_ci95_points": change["ci95_points"], "beyond_noise": change["beyond_noise"]})
    worst = sorted((r for r in rows if r["delta"] < 0), key=lambda r: r["delta"])[:3]
    return {"rows": rows, "dropped_most": [r["segment"] for r in worst]}
