"""Serving cost from measured latency: hosts needed dense vs pruned at a target QPS, and per year.

How the field reports pruning to management: the report's own latency at the serving batch
size becomes throughput per host (batch / latency), the target QPS becomes a host count
(rounded up: a fraction of a host is a whole host), and an optional price per host-hour
becomes a yearly cost. Nothing is modelled or extrapolated: a batch size the report did not
time is refused, and the formula is printed with the measured numbers in it so a reader can
redo the sum.

Sizing uses the p99 latency by default: a host sized at its tail latency keeps up with the
target rate even when its calls run slow, which is how a latency SLA is provisioned; the p50
figures are shown beside it. One host is assumed to serve one batch at a time with the
threads the report was timed with (the report's environment names the CPU).
"""

from __future__ import annotations

import math
from typing import Annotated, Any, Literal

from pydantic import Field

from prunekit.config import FrozenConfig
from prunekit.errors import ConfigError

HOURS_PER_YEAR = 8760  # 365 days x 24 h
Positive = Annotated[float, Field(gt=0, allow_inf_nan=False)]
MODELS = ("baseline", "pruned")


class CostQuery(FrozenConfig):
    """What to project: the target rate, the serving batch size and the price of a host.

    Attributes:
        qps: target queries (examples) per second across the fleet; > 0.
        serving_batch: batch size served; must be one the report timed.
        price_per_host_hour: price of one host for one hour (any currency); None projects hosts only.
        statistic: latency statistic the hosts are sized by; "p99" (default, SLA-safe) or "p50".
    """

    qps: Positive
    serving_batch: Annotated[int, Field(ge=1)]
    price_per_host_hour: Positive | None = None
    statistic: Literal["p50", "p99"] = "p99"


def check_batch(query: CostQuery, batch_sizes: list[int]) -> None:
    """Refuse a serving batch size that is not among the timed `batch_sizes`; pure.

    Raises:
        ConfigError: `query.serving_batch` was not measured (the message names the measured ones).
    """
    if query.serving_batch not in batch_sizes:
        measured = ", ".join(str(b) for b in batch_sizes) or "none"
        raise ConfigError(f"CostQuery.serving_batch: batch size {query.serving_batch} was not measured by the "
                          f"report (measured: {measured}); time it with batch_sizes=(..., {query.serving_batch}) "
                          "or pick a measured one")


def _hosts(qps: float, batch: int, latency_ms: float) -> dict[str, float | int]:
    throughput = batch / (latency_ms / 1000)
    # a relative tolerance keeps an exact fit (e.g. 2.0000000001 hosts) from costing a whole host
    return {"latency_ms": latency_ms, "throughput_qps": throughput,
            "hosts": max(1, math.ceil(qps / throughput * (1 - 1e-12)))}


def cost_block(report: dict[str, Any], query: CostQuery) -> dict[str, Any]:
    """The cost projection of a report dict (`compare(...).data`) for `query`; pure.

    Returns:
        {"qps", "serving_batch", "price_per_host_hour", "statistic", "hours_per_year",
        "speed_call", "baseline": {"p50": {...}, "p99": {...}, "hosts", "yearly_cost"},
        "pruned": {...}, "hosts_saved", "yearly_saving"}; each per-statistic entry holds
        "latency_ms", "throughput_qps" (per host) and "hosts". Costs are None without a price.

    Raises:
        ConfigError: the report has no latency for `query.serving_batch`, or no latency section.
    """
    rows = report.get("latency", {}).get("by_batch")
    if not isinstance(rows, list):
        raise ConfigError("cost: the report has no latency.by_batch section; project cost from a report written "
                          "by prunekit's compare")
    check_batch(query, [int(r["batch_size"]) for r in rows])
    row = next(r for r in rows if int(r["batch_size"]) == query.serving_batch)
    out: dict[str, Any] = {"qps": query.qps, "serving_batch": query.serving_batch,
                           "price_per_host_hour": query.price_per_host_hour, "statistic": query.statistic,
                           "hours_per_year": HOURS_PER_YEAR, "speed_call": row.get("speed_call"),
                           "timed_calls": row.get("timed_calls")}
    for name in MODELS:
        stats = {s: _hosts(query.qps, query.serving_batch, float(row[f"{name}_ms_{s}"])) for s in ("p50", "p99")}
        hosts = int(stats[query.statistic]["hosts"])
        price = query.price_per_host_hour
        out[name] = {**stats, "hosts": hosts,
                     "yearly_cost": None if price is None else hosts * price * HOURS_PER_YEAR}
    out["hosts_saved"] = out["baseline"]["hosts"] - out["pruned"]["hosts"]
    out["yearly_saving"] = (None if query.price_per_host_hour is None
                            else out["baseline"]["yearly_cost"] - out["pruned"]["yearly_cost"])
    return out


def _num(v: float) -> str:
    return f"{v:,.0f}" if v >= 100 else f"{v:,.2f}" if v >= 1 else f"{v:.4g}"


def cost_verdict(c: dict[str, Any]) -> str:
    """One sentence: hosts (and yearly cost) dense vs pruned, and whether the difference is measurable."""
    b, p = c["baseline"], c["pruned"]
    line = (f"hosts for {_num(c['qps'])} QPS at batch {c['serving_batch']} (sized by {c['statistic']}): "
            f"{b['hosts']:,} dense vs {p['hosts']:,} pruned")
    if c["price_per_host_hour"] is not None:
        line += f"; yearly {b['yearly_cost']:,.2f} vs {p['yearly_cost']:,.2f} (saves {c['yearly_saving']:,.2f})"
    if c.get("speed_call") not in (None, "faster") and c["hosts_saved"] != 0:
        line += "; the speed-up at this batch size is within the run's noise, so this difference is not measured"
    return line


def cost_markdown(c: dict[str, Any], cpu: str = "") -> list[str]:
    """The cost section as Markdown lines: the formula with the measured numbers, and a table."""
    stat, batch, qps = c["statistic"], c["serving_batch"], c["qps"]
    where = f" on {cpu}" if cpu else ""
    rows = [f"Measured throughput only: one host serves one batch of {batch} at a time{where}, at the report's "
            f"thread count; hosts are sized by {stat} latency (a host that keeps up at its tail latency meets "
            "the rate under an SLA), p50 shown beside it."
            + (f" With {c['timed_calls']} timed calls the p99 is close to the slowest call: time more "
               "calls (repeats) for a steadier tail." if c.get("timed_calls") and c["timed_calls"] < 100 else ""), ""]
    for name, label in (("baseline", "dense"), ("pruned", "pruned")):
        s = c[name][stat]
        rows.append(f"- {label}: hosts = ceil(QPS / (batch × 1,000 / {stat} latency in ms)) = ceil({_num(qps)} / "
                    f"({batch} × 1,000 / {s['latency_ms']:.4g})) = ceil({_num(qps)} / {_num(s['throughput_qps'])}) "
                    f"= {s['hosts']:,}")
        if c["price_per_host_hour"] is not None:
            rows.append(f"- {label}: yearly cost = hosts × price per host-hour × {HOURS_PER_YEAR:,} h = "
                        f"{s['hosts']:,} × {c['price_per_host_hour']:,.4g} × {HOURS_PER_YEAR:,} = "
                        f"{c[name]['yearly_cost']:,.2f}")
    rows += ["", "| | latency p50 (ms) | throughput/host p50 | hosts p50 | latency p99 (ms) | throughput/host p99 "
             f"| hosts p99 | yearly cost ({stat} hosts) |", "|---|---|---|---|---|---|---|---|"]
    for name, label in (("baseline", "dense"), ("pruned", "pruned")):
        m = c[name]
        cost = "-" if m["yearly_cost"] is None else f"{m['yearly_cost']:,.2f}"
        rows.append(f"| {label} | {m['p50']['latency_ms']:.3f} | {_num(m['p50']['throughput_qps'])} | "
                    f"{m['p50']['hosts']:,} | {m['p99']['latency_ms']:.3f} | {_num(m['p99']['throughput_qps'])} | "
                    f"{m['p99']['hosts']:,} | {cost} |")
    rows += ["", cost_verdict(c) + "."]
    return rows
