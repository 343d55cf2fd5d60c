"""A gate for continuous pruning: a report.json against a budget, and against the previous report.

Every model update is pruned, measured by `compare` and gated here before it ships: one line
per broken budget (accuracy drop, the worst class or segment, p99 latency at a batch size,
size, sparsity), and with the previous run's report a short diff that says what regressed, by
how much, and whether the change is beyond the runs' own measured noise. `prunekit check` is
the command-line face (exit code 1 when a budget is broken).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import Field

from prunekit.config import FrozenConfig, config_from_dict, read_config_file, recipe_type
from prunekit.errors import ConfigError
from prunekit.measure.noise import Z95
from prunekit.storage.files import read_document


@recipe_type
class Budget(FrozenConfig):
    """What a pruned model must meet to ship; every limit is optional (None: not checked).

    Example:
        >>> Budget(max_accuracy_drop_points=1.0, max_latency_ms_p99=5.0, batch_size=8).batch_size
        8
    """

    max_accuracy_drop_points: float | None = Field(default=None, ge=0)
    max_segment_drop_points: float | None = Field(default=None, ge=0)  # any class, and any segment
    max_latency_ms_p99: float | None = Field(default=None, gt=0)
    batch_size: int = Field(default=1, ge=1)  # where max_latency_ms_p99 is read
    max_size_bytes: int | None = Field(default=None, gt=0)
    min_sparsity: float | None = Field(default=None, ge=0, lt=1)
    fail_on_regression: bool = False  # with a previous report: a regression beyond noise breaks the budget


@dataclass
class GateResult:
    """The broken budgets (one line each; empty when all pass) and the diff against a previous report."""

    broken: list[str] = field(default_factory=list)
    diff: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return not self.broken

    def summary(self) -> str:
        """The broken budgets, then the diff, one per line."""
        head = [f"budget broken: {line}" for line in self.broken] or ["all budgets met"]
        return "\n".join(head + ([""] + [f"since the previous report: {line}" for line in self.diff]
                                 if self.diff else []))

    def __str__(self) -> str:
        return self.summary()


def load_budget(path: str | Path) -> Budget:
    """Read a budget from YAML or JSON: the fields at the top level (`_type: Budget` optional).

    Raises:
        ConfigError: the file is unreadable or not a mapping, or a key is unknown or out of
            range (the message names it).
    """
    path = Path(path)
    data = read_config_file(path, "budget")
    if not isinstance(data, dict):
        raise ConfigError(f"budget {str(path)!r}: expected a mapping of limits such as max_accuracy_drop_points")
    if "_type" in data:
        budget = config_from_dict(data, where=path.name)
        if not isinstance(budget, Budget):
            raise ConfigError(f"budget {str(path)!r}: _type must be Budget, got {type(budget).__name__}")
        return budget
    return Budget(**data)


def load_report(path: str | Path) -> dict[str, Any]:
    """Read a report.json written by `Report.save`.

    Raises:
        ConfigError: the file is missing or not a JSON object.
    """
    text = read_document(path, "report", ConfigError)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise ConfigError(f"report {str(path)!r} is not valid JSON: {err}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"report {str(path)!r}: expected a JSON object written by prunekit's compare")
    return data


def _get(d: dict[str, Any], key: str, budget_field: str) -> Any:
    value: Any = d
    for part in key.split("."):
        if not isinstance(value, dict) or part not in value:
            raise ConfigError(f"report has no {key!r}, which budget field {budget_field!r} needs: gate a "
                              "classification report written by prunekit's compare, or drop that field")
        value = value[part]
    return value


def _identity(d: dict[str, Any]) -> dict[str, Any]:
    classes = [r.get("class") for r in d.get("accuracy", {}).get("per_class", [])]
    return {"title": d.get("title"), "kind": d.get("kind", "classification"), "examples": d.get("examples"),
            "baseline params": d.get("baseline", {}).get("params"), "classes": classes}


def same_subject(report: dict[str, Any], previous: dict[str, Any]) -> None:
    """Refuse two reports of different models or data (title, kind, example count, baseline
    params, class names); mutates nothing.

    Raises:
        ConfigError: naming each field that differs and both values.
    """
    new, old = _identity(report), _identity(previous)
    differ = [f"{k}: {old[k]!r} (previous) vs {new[k]!r} (new)" for k in new if new[k] != old[k]]
    if differ:
        raise ConfigError("refusing to compare reports of different models or data; " + "; ".join(differ)
                          + ". Gate each model against its own previous report")


def check_report(report: dict[str, Any], budget: Budget, previous: dict[str, Any] | None = None) -> GateResult:
    """Check a report's measurements against `budget` (and against `previous`); mutates nothing.

    Args:
        report: report.json data from `compare` (`Report.data`, or `load_report`).
        budget: the limits.
        previous: the last shipped model's report, for the diff (same model and data).

    Returns:
        A `GateResult`: one line per broken budget, and the diff lines when `previous` is given.

    Raises:
        ConfigError: `previous` is a report of another model or data set, or the report lacks
            what a budget field needs (a latency budget at a batch size it did not measure).
    """
    if previous is not None:
        same_subject(report, previous)
    broken: list[str] = []
    if budget.max_accuracy_drop_points is not None:
        broken += _accuracy_budget(report, budget.max_accuracy_drop_points)
    if budget.max_segment_drop_points is not None:
        broken += _segment_budget(report, budget.max_segment_drop_points)
    if budget.max_latency_ms_p99 is not None:
        row = _latency_row(report, budget.batch_size, "max_latency_ms_p99")
        if row["pruned_ms_p99"] > budget.max_latency_ms_p99:
            broken.append(f"latency p99 at batch {budget.batch_size}: {row['pruned_ms_p99']:.3f} ms > budget "
                          f"{budget.max_latency_ms_p99:g} ms (baseline {row['baseline_ms_p99']:.3f} ms)")
    if budget.max_size_bytes is not None:
        size = _get(report, "pruned.size_bytes", "max_size_bytes")
        if size > budget.max_size_bytes:
            broken.append(f"size: {size:,} B > budget {budget.max_size_bytes:,} B")
    if budget.min_sparsity is not None:
        value = _get(report, "pruned.sparsity", "min_sparsity")
        if value < budget.min_sparsity:
            broken.append(f"sparsity: {value:.2%} < budget {budget.min_sparsity:.2%}")
    if previous is None:
        return GateResult(broken)
    diff, regressed = report_diff(report, previous, budget.batch_size)
    if budget.fail_on_regression:
        broken += [f"regressed beyond noise: {line}" for line in regressed]
    return GateResult(broken, diff)


def _accuracy_budget(report: dict[str, Any], limit: float) -> list[str]:
    b = _get(report, "baseline.accuracy", "max_accuracy_drop_points")
    p = _get(report, "pruned.accuracy", "max_accuracy_drop_points")
    drop = 100 * (b - p)
    if drop <= limit:
        return []
    change = report.get("accuracy", {}).get("top1_change")
    noise = "" if change is None else (
        f"; paired 95 % CI of the change {change['ci95_points'][0]:+.2f} to {change['ci95_points'][1]:+.2f} "
        f"points: {'beyond' if change['beyond_noise'] else 'within'} noise")
    return [f"accuracy drop {drop:.2f} points > budget {limit:g} (pruned {p:.2%} vs baseline {b:.2%} on "
            f"{report.get('examples', '?')} examples{noise})"]


def _segment_budget(report: dict[str, Any], limit: float) -> list[str]:
    out = []
    rows = [("class", r["class"], r) for r in _get(report, "accuracy.per_class", "max_segment_drop_points")]
    rows += [("segment", r["segment"], r) for r in report["accuracy"].get("segments", {}).get("rows", [])]
    for kind, name, r in rows:
        if -100 * r["delta"] > limit:
            noise = "" if "beyond_noise" not in r else f", {'beyond' if r['beyond_noise'] else 'within'} noise"
            out.append(f"{kind} {name!r} dropped {-100 * r['delta']:.2f} points > budget {limit:g} "
                       f"({r['pruned']:.2%} vs {r['baseline']:.2%} on {r['count']} examples{noise})")
    return out


def _latency_row(report: dict[str, Any], batch_size: int, budget_field: str) -> dict[str, Any]:
    rows = _get(report, "latency.by_batch", budget_field)
    for row in rows:
        if row["batch_size"] == batch_size:
            return row
    have = ", ".join(str(r["batch_size"]) for r in rows)
    raise ConfigError(f"budget batch_size {batch_size}: the report measured latency at batch sizes {have} "
                      "only; measure that batch size or set batch_size to one of them")


def report_diff(report: dict[str, Any], previous: dict[str, Any], batch_size: int = 1) -> tuple[list[str], list[str]]:
    """What changed since `previous` (one line each) and the regressions beyond noise among them; pure."""
    diff: list[str] = []
    regressed: list[str] = []

    def note(line: str, worse: bool, beyond: bool) -> None:
        diff.append(f"{line} ({'worse' if worse else 'better or same'}, {'beyond' if beyond else 'within'} noise)")
        if worse and beyond:
            regressed.append(line)

    n = report.get("examples") or 0
    p_new, p_old = report["pruned"]["accuracy"], previous["pruned"]["accuracy"]
    se = math.sqrt(max(p_new * (1 - p_new) + p_old * (1 - p_old), 0.0) / max(n, 1))
    note(f"pruned accuracy {p_old:.2%} -> {p_new:.2%} ({100 * (p_new - p_old):+.2f} points; 95 % noise "
         f"±{100 * Z95 * se:.2f} on {n} examples)", p_new < p_old, abs(p_new - p_old) > Z95 * se)
    old_rows = {r["batch_size"]: r for r in previous.get("latency", {}).get("by_batch", [])}
    for row in report.get("latency", {}).get("by_batch", []):
        old = old_rows.get(row["batch_size"])
        if old is None:
            continue
        new_ci, old_ci = row.get("speedup_ci95"), old.get("speedup_ci95")
        apart = new_ci is not None and old_ci is not None and (new_ci[1] < old_ci[0] or new_ci[0] > old_ci[1])
        note(f"speed-up at batch {row['batch_size']} {old['speedup']:.2f}x -> {row['speedup']:.2f}x "
             f"({row['speedup'] / old['speedup'] - 1:+.1%})", row["speedup"] < old["speedup"], apart)
        if row["batch_size"] == batch_size:
            change = row["pruned_ms_p99"] / old["pruned_ms_p99"] - 1
            spread = max(report["latency"].get("halves_spread") or 0, previous["latency"].get("halves_spread") or 0)
            note(f"pruned p99 at batch {batch_size} {old['pruned_ms_p99']:.3f} -> {row['pruned_ms_p99']:.3f} ms "
                 f"({change:+.1%}; the runs' halves differed by up to {spread:.1%})", change > 0,
                 spread > 0 and abs(change) > spread)
    size_new, size_old = report["pruned"]["size_bytes"], previous["pruned"]["size_bytes"]
    if size_new != size_old:  # sizes are exact: any change is real
        note(f"size {size_old:,} -> {size_new:,} B ({size_new / size_old - 1:+.1%})", size_new > size_old, True)
    return diff, regressed
