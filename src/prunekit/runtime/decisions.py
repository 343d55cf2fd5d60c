"""What `accelerate` decided, per layer and in all: `LayerDecision` rows and the `AccelerationReport`.

Its own module because both steps of `accelerate` write these rows: `autotune` measures and
chooses, `fusion` marks the layers it fused. The report is saved as a JSON document tagged with
`FORMAT` and `FORMAT_VERSION`.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from prunekit.storage.files import atomic_write_text

FORMAT = "prunekit.acceleration_report"
FORMAT_VERSION = 1


@dataclass
class LayerDecision:
    """One row of the decision table; times are median ms per call, keyed by candidate then batch size."""

    fqn: str
    shape: tuple[int, int]
    sparsity: float
    block: tuple[int, int] | None
    ms: dict[str, dict[int, float]]
    choice: str = "dense"
    reason: str = ""
    check_ms: dict[str, dict[int, float]] = field(default_factory=dict)
    fused_with: list[str] = field(default_factory=list)  # siblings sharing this layer's kernel call

    def speedup(self, name: str, batch: int) -> float:
        """Dense's time over candidate `name`'s at `batch` (above 1: the candidate is faster)."""
        return self.ms["dense"][batch] / max(self.ms[name][batch], 1e-9)


@dataclass
class AccelerationReport:
    """The decision table of one `accelerate` call; `save` writes it as JSON, `summary` as text."""

    batch_sizes: tuple[int, ...]
    threads: int
    tolerance: float
    max_rel_error: float
    layers: list[LayerDecision]
    attention: str = ""  # the attention backend kept, and the forward times it was chosen on ("": not tried)

    def to_dict(self) -> dict[str, Any]:
        """The table as a JSON-ready dict, tagged with `FORMAT` and its version (`report_version`)."""
        return {"format": FORMAT, "report_version": FORMAT_VERSION, **asdict(self)}

    def save(self, path: str | Path) -> Path:
        """Write the table as JSON atomically and return the path."""
        return atomic_write_text(path, json.dumps(self.to_dict(), indent=2, default=str))

    def rich_table(self) -> Any:
        """The table as a `rich.table.Table`, one row per layer and batch size, candidates fastest first."""
        from rich.table import Table

        table = Table(title=f"prunekit.accelerate ({self.threads} threads; ms = median per call)",
                      caption=f"attention: {self.attention}" if self.attention else None)
        for col in ("layer", "shape", "sparsity", "batch", "candidates (ms)", "choice"):
            table.add_column(col)
        for d in self.layers:
            for b in self.batch_sizes:
                times = "\n".join(f"{k} {v[b]:.3f}" for k, v in sorted(d.ms.items(), key=lambda kv: kv[1][b]))
                table.add_row(
                    d.fqn,
                    f"{d.shape[0]}x{d.shape[1]}",
                    f"{d.sparsity:.1%}",
                    str(b),
                    times,
                    (f"{d.choice} ({d.speedup(d.choice, b):.2f}x)" if d.choice in d.ms else d.choice)
                    + (" fused" if d.fused_with else ""),
                )
        return table

    def untuned(self, batch: int) -> str | None:
        """None for a tuned batch size; otherwise which tuned decision a call at `batch` runs, and that it is untimed.

        Each layer has one choice for every batch size (the kernels pick their own path by row
        count), so a batch size nobody timed runs the choices of the nearest tuned one.
        """
        if batch in self.batch_sizes:
            return None
        nearest = min(self.batch_sizes, key=lambda b: (abs(b - batch), -b))
        return (f"batch {batch} was not tuned: it runs the choices tuned at batch {nearest} (the nearest), "
                "whose speed at this batch was not measured")

    def summary(self) -> str:
        """The table as plain text: one line per layer with its choice and speed-up per batch size."""
        lines = [
            f"accelerate: batch sizes {self.batch_sizes}, {self.threads} threads, "
            f"max relative output error {self.max_rel_error:.2e} (tolerance {self.tolerance:.0e}); "
            f"a larger batch runs the choices tuned at batch {max(self.batch_sizes)}, untimed"
        ]
        if self.attention:
            lines.append(f"  attention: {self.attention}")
        for d in self.layers:
            gains = ", ".join(f"b{b} {d.speedup(d.choice, b):.2f}x" for b in self.batch_sizes if d.choice in d.ms)
            fused = f" fused with {', '.join(d.fused_with)}" if d.fused_with else ""
            head = f"  {d.fqn} {d.shape[0]}x{d.shape[1]} {d.sparsity:.1%}: {d.choice}{fused}"
            lines.append(f"{head} ({gains}) {d.reason}")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.summary()
