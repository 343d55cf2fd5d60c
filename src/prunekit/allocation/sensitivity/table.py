"""The result of a sensitivity scan: one metric per (layer or channel group, level), saved as JSON.

`prunekit.sensitivity` measures it, `prunekit.allocate` reads it; the file is plain JSON validated
against a schema on load (nothing executable), so a table can be shared and re-used.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel

from prunekit.config import FrozenConfig, config_from_dict
from prunekit.errors import ConfigError, PrunekitError
from prunekit.storage.files import JsonDocument, atomic_write_bytes, validate_document

FORMAT = "prunekit.sensitivity"  # the on-disk tag of a saved table; files written by 0.1 carry it too
FORMAT_VERSION = 1


class _TableDocument(BaseModel):
    """The JSON schema of a saved `SensitivityTable` (unknown extra keys are ignored)."""

    format: Literal["prunekit.sensitivity"]
    version: Literal[1]
    kind: Literal["layer", "group"] = "layer"
    units: list[str]
    levels: list[float]
    values: dict[str, list[float | None]]
    baseline: float
    higher_is_better: bool
    family: dict[str, Any]
    params: dict[str, int]
    flops: dict[str, int] | None = None
    total_params: int
    total_flops: int | None = None
    failures: dict[str, str] = {}
    removed: dict[str, dict[str, list[float]]] | None = None


@dataclass
class SensitivityTable(JsonDocument):
    """Metric of the model with one unit (layer or channel group) pruned at each level.

    Attributes:
        units: layer FQNs (or channel-group names) in model order.
        levels: the pruning levels scanned (sparsity for mask configs, ratio for channels).
        values: unit -> one metric per level; NaN where `evaluate` failed.
        baseline: the metric of the unpruned model.
        higher_is_better: True for accuracy, False for loss or perplexity.
        family: the config family scanned, as recipe data (`config_to_dict`).
        params: unit -> parameters its level acts on (the weight's numel; a group's total).
        flops: unit -> dense forward FLOPs of the layer (2 per multiply-add), if measured.
        total_params: parameters of the whole model (units, biases, norms, skipped layers).
        total_flops: dense forward FLOPs of the whole model, if measured.
        failures: "unit@level" -> why `evaluate` gave no number.
        kind: "layer" or "group".
    """

    document_name = "sensitivity table"
    document_error = ConfigError
    json_indent = 2

    units: list[str]
    levels: list[float]
    values: dict[str, list[float]]
    baseline: float
    higher_is_better: bool
    family: dict[str, Any]
    params: dict[str, int]
    flops: dict[str, int] | None = None
    total_params: int = 0
    total_flops: int | None = None
    failures: dict[str, str] = field(default_factory=dict)
    kind: Literal["layer", "group"] = "layer"
    removed: dict[str, dict[str, list[int]]] | None = None

    def removed_at(self, resource: Literal["params", "flops"], unit: str, level_index: int) -> float:
        """Parameters or FLOPs that pruning `unit` at level `level_index` removes.

        Layers: level x the layer's total (exact for masks). Channel groups: measured on the
        probe's pruned copy (`removed`), which also counts the shrunken inputs of the next layer.
        """
        if self.removed is not None:
            return float(self.removed[resource][unit][level_index])
        totals = self.params if resource == "params" else self.flops
        if totals is None:
            raise ConfigError("the table has no per-layer FLOPs: pass example_inputs= to sensitivity()")
        return self.levels[level_index] * totals[unit]

    def degradation(self, unit: str, level_index: int) -> float:
        """How much worse than baseline the metric got (>= 0 means worse); NaN if unmeasured."""
        value = self.values[unit][level_index]
        return self.baseline - value if self.higher_is_better else value - self.baseline

    def config(self) -> FrozenConfig:
        """The config family the table was scanned with, rebuilt from its recipe data."""
        return config_from_dict(self.family, where="SensitivityTable.family")

    # -- text ----------------------------------------------------------------------------

    def summary(self) -> str:
        """One row per unit, one column per level; failed cells print as 'fail'."""
        width = max([len(u) for u in self.units] + [5])
        head = f"{'unit':<{width}}  " + "  ".join(f"{lv:>8.3g}" for lv in self.levels)
        rows = [f"baseline {self.baseline:.4g} ({'higher' if self.higher_is_better else 'lower'} is better)", head]
        for unit in self.units:
            cells = ["    fail" if math.isnan(v) else f"{v:8.4g}" for v in self.values[unit]]
            rows.append(f"{unit:<{width}}  " + "  ".join(cells))
        rows += [f"failed {key}: {why}" for key, why in self.failures.items()]
        return "\n".join(rows)

    def __str__(self) -> str:
        return self.summary()

    # -- files ---------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able data; NaN cells become null."""
        return {
            "format": FORMAT,
            "version": FORMAT_VERSION,
            "kind": self.kind,
            "units": self.units,
            "levels": self.levels,
            "values": {u: [None if math.isnan(v) else v for v in vs] for u, vs in self.values.items()},
            "baseline": self.baseline,
            "higher_is_better": self.higher_is_better,
            "family": self.family,
            "params": self.params,
            "flops": self.flops,
            "total_params": self.total_params,
            "total_flops": self.total_flops,
            "failures": self.failures,
            "removed": self.removed,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SensitivityTable:
        """Rebuild a table from `to_dict` output (checks the format tag and version)."""
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise ConfigError(f"not a sensitivity table: 'format' must be {FORMAT!r}")
        if data.get("version") != FORMAT_VERSION:
            raise ConfigError(f"sensitivity table version {data.get('version')!r} is not {FORMAT_VERSION}")
        validate_document(data, _TableDocument, "sensitivity table", ConfigError)
        try:
            values = {u: [math.nan if v is None else float(v) for v in vs] for u, vs in data["values"].items()}
            table = cls(
                units=list(data["units"]), levels=[float(x) for x in data["levels"]], values=values,
                baseline=float(data["baseline"]), higher_is_better=bool(data["higher_is_better"]),
                family=data["family"], params={k: int(v) for k, v in data["params"].items()},
                flops=None if data.get("flops") is None else {k: int(v) for k, v in data["flops"].items()},
                total_params=int(data["total_params"]), total_flops=data.get("total_flops"),
                failures=dict(data.get("failures", {})),
                kind=data.get("kind", "layer"), removed=data.get("removed"),
            )
        except (KeyError, TypeError, ValueError) as err:
            raise ConfigError(f"sensitivity table is missing or has a bad field: {err}") from None
        for unit in table.units:
            if len(table.values.get(unit, [])) != len(table.levels):
                raise ConfigError(f"sensitivity table: unit {unit!r} has no value for every level")
        return table

    def plot(self, path: str | Path) -> Path:
        """Draw the degradation heat map (unit x level) as a PNG, atomically; needs matplotlib."""
        return _plot_table(self, path)


def _plot_table(table: SensitivityTable, path: str | Path) -> Path:
    try:
        import matplotlib

        matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt
    except ImportError:
        raise PrunekitError("the sensitivity heat map needs matplotlib: pip install 'prunekit[plot]'") from None
    import io

    import numpy as np

    grid = np.array([[table.degradation(u, i) for i in range(len(table.levels))] for u in table.units])
    width = 2.5 + 0.9 * len(table.levels) + 0.06 * max(len(u) for u in table.units)
    fig, ax = plt.subplots(figsize=(width, 1.5 + 0.35 * len(table.units)))
    try:
        image = ax.imshow(np.ma.masked_invalid(grid), cmap="magma_r", aspect="auto")
        ax.set_xticks(range(len(table.levels)), [f"{lv:g}" for lv in table.levels])
        ax.set_yticks(range(len(table.units)), table.units)
        ax.set_xlabel("sparsity" if table.kind == "layer" else "channel ratio")
        for (r, c), v in np.ndenumerate(grid):
            ax.text(c, r, "fail" if np.isnan(v) else f"{v:.3g}", ha="center", va="center", fontsize=7, color="gray")
        worse = "baseline - metric" if table.higher_is_better else "metric - baseline"
        fig.colorbar(image, ax=ax, label="degradation")
        ax.set_title(f"degradation = {worse} (baseline {table.baseline:.4g})", fontsize=9)
        fig.tight_layout()
        buffer = io.BytesIO()
        fig.savefig(buffer, format="png", dpi=110)
    finally:
        plt.close(fig)
    return atomic_write_bytes(path, buffer.getvalue())
