"""The allocation solver shared by `allocate` (one model) and `allocate_pipeline` (several).

Each unit (a layer or a channel group) has a curve of (saving, damage, level) points: how
much of a budget's resource a level saves and how much measured degradation it costs. The
walk is the Lagrangian / greedy marginal-cost allocation of rate-distortion theory (Everett
1963; Shoham & Gersho 1988, "Efficient bit allocation for an arbitrary set of quantizers"):
every lower-convex-hull segment of every curve, cheapest damage per unit of saving first,
until the required saving is reached; then units step back while the budget holds, and
(`exact`) one unit is interpolated between two scanned levels. `prunekit.allocation.allocate`
explains the choice of method; this module holds only the arithmetic, on plain curves, so a
pipeline can run it over the union of several models' units.
"""

from __future__ import annotations

import math

from prunekit.allocation.sensitivity.table import SensitivityTable
from prunekit.errors import AllocationError

Point = tuple[float, float, float]  # (saving, damage, level)


def unit_curve(table: SensitivityTable, unit: str, savings: list[float], start: float = 0.0) -> list[Point]:
    """(saving, damage, level) points of one unit from dense, usable (finite) and monotone in damage.

    Levels up to `start` fold into the first point: the unit starts there (a floor another
    constraint set, e.g. a pipeline stage's size budget), even where they save nothing more.
    """
    points = [(0.0, 0.0, 0.0)]
    worst = 0.0
    for i, level in enumerate(table.levels):
        damage = table.degradation(unit, i)
        if math.isnan(damage):
            break  # a failed probe: never go that far
        worst = max(worst, damage)
        if start > 0 and level <= start + 1e-12:
            points[0] = (max(points[0][0], savings[i]), worst, level)
        elif savings[i] > points[-1][0]:
            points.append((savings[i], worst, level))
    return points


def usable_points(table: SensitivityTable, savings: dict[str, list[float]], *, max_level: float | None = None,
                  min_level: float | None = None, start: dict[str, float] | None = None) -> dict[str, list[Point]]:
    """Each unit's curve within [min_level, max_level]; a new dict, nothing mutated.

    `start` (unit -> scanned level) makes a unit's curve begin at that level (`unit_curve`).

    Raises:
        AllocationError: `min_level` leaves a unit with no scanned level.
    """
    points = {}
    for unit in table.units:
        curve = unit_curve(table, unit, savings[unit], (start or {}).get(unit, 0.0))
        points[unit] = [p for p in curve if max_level is None or p[2] <= max_level + 1e-12]
        if min_level is not None:
            points[unit] = [p for p in points[unit] if p[2] >= min_level - 1e-12]
            if not points[unit]:
                raise AllocationError(f"unit {unit!r} has no usable scanned level in [{min_level:g}, "
                                      f"{max_level if max_level is not None else 1:g}]: widen the band or rescan")
    return points


def hull(points: list[Point]) -> list[Point]:
    """Lower convex hull of (saving, damage) points sorted by saving (Andrew's monotone chain)."""
    out: list[Point] = []
    for p in points:
        while len(out) >= 2:
            (x1, y1, _), (x2, y2, _) = out[-2], out[-1]
            # Pop out[-1] when it lies strictly above the chord: never worth stopping there.
            # Collinear points stay, so flat (insensitive) curves are walked level by level.
            if (x2 - x1) * (p[1] - y1) - (y2 - y1) * (p[0] - x1) < 0:
                out.pop()
            else:
                break
        out.append(p)
    return out


def segments(curves: dict[str, list[Point]]) -> list[tuple[float, int, str]]:
    """Every hull segment as (damage per unit of saving, index of its end, unit), cheapest first.

    A unit's own segments come in order because a convex hull's slopes increase.
    """
    out = []
    for unit, h in curves.items():
        for k in range(1, len(h)):
            (x0, y0, _), (x1, y1, _) = h[k - 1], h[k]
            out.append(((y1 - y0) / (x1 - x0), k, unit))
    out.sort()
    return out


def frontier(points: dict[str, list[Point]]) -> list[tuple[float, float]]:
    """The (total saving, total damage) vertices the walk passes through, from every unit's start.

    Piecewise linear and convex: the least predicted damage at any total saving (of the
    relaxation) is read off it by linear interpolation.
    """
    curves = {u: hull(p) for u, p in points.items()}
    saved = sum(c[0][0] for c in curves.values())
    damage = sum(c[0][1] for c in curves.values())
    out = [(saved, damage)]
    for _, k, unit in segments(curves):
        (x0, y0, _), (x1, y1, _) = curves[unit][k - 1], curves[unit][k]
        saved, damage = saved + x1 - x0, damage + y1 - y0
        out.append((saved, damage))
    return out


def fractional(points: dict[str, list[Point]], required: float) -> tuple[dict[str, float], float, float]:
    """The relaxation's optimum: hull segments cheapest first, the last one taken in part.

    Unlike `walk` it never overshoots, so it needs no stepping back (which, on a flat stretch,
    can give back a free saving and leave the budget to a costly one); levels are
    interpolated on the one partial segment. Used where a level is itself continuous (a
    pipeline group's latency cap).

    Returns:
        (unit -> level, total saving, total predicted damage).
    """
    curves = {u: hull(p) for u, p in points.items()}
    levels = {u: c[0][2] for u, c in curves.items()}
    saved = sum(c[0][0] for c in curves.values())
    damage = sum(c[0][1] for c in curves.values())
    for _, k, unit in segments(curves):
        if saved >= required - 1e-12:
            break
        (x0, y0, l0), (x1, y1, l1) = curves[unit][k - 1], curves[unit][k]
        t = min(1.0, (required - saved) / (x1 - x0))
        levels[unit] = l0 + t * (l1 - l0)
        saved, damage = saved + t * (x1 - x0), damage + t * (y1 - y0)
    return levels, saved, damage


def walk(points: dict[str, list[Point]], required: float, *,
         exact: bool = True) -> tuple[dict[str, float], float, float]:
    """The levels that save at least `required` with the least predicted damage.

    The caller checks first that `required` is reachable (the sum of each unit's last saving).

    Returns:
        (unit -> level, total saving, total predicted damage).
    """
    curves = {u: hull(p) for u, p in points.items()}
    position = dict.fromkeys(points, 0)
    saved = sum(c[0][0] for c in curves.values())  # each unit's starting point (dense, or min_level)
    for _, k, unit in segments(curves):
        if saved >= required - 1e-9:
            break
        position[unit] = k
        saved += curves[unit][k][0] - curves[unit][k - 1][0]
    chosen = {u: points[u].index(curves[u][position[u]]) for u in points}
    saved = _trim(points, chosen, saved, required)
    levels = {u: points[u][i][2] for u, i in chosen.items()}
    damage = sum(points[u][i][1] for u, i in chosen.items())
    if exact and saved > required + 1e-9:
        saved, damage = _interpolate(points, chosen, levels, saved, damage, required)
    return levels, saved, damage


def _trim(points: dict[str, list[tuple[float, float, float]]], chosen: dict[str, int], saved: float,
          required: float) -> float:
    """Step units back down their curves while the budget still holds (mutates `chosen`).

    The hull walk stops at hull vertices, so its last step can overshoot the budget, and a
    flat stretch of a curve (no measured damage) lets it jump to the highest level. Stepping
    back never raises predicted damage; the step giving back the most damage per unit of
    saving goes first, and on ties the highest level steps back first (prune less where the
    scan saw no difference: the prediction is least sure there).
    """
    while True:
        best = None
        for unit, i in chosen.items():
            if i == 0:
                continue
            lost = points[unit][i][0] - points[unit][i - 1][0]
            if saved - lost < required - 1e-9:
                continue
            key = ((points[unit][i][1] - points[unit][i - 1][1]) / lost, points[unit][i][2], lost)
            if best is None or key > best[0]:
                best = (key, unit, lost)
        if best is None:
            return saved
        chosen[best[1]] -= 1
        saved -= best[2]


def _interpolate(points: dict[str, list[tuple[float, float, float]]], chosen: dict[str, int],
                 levels: dict[str, float], saved: float, damage: float, required: float) -> tuple[float, float]:
    """Move one unit to an unscanned level between two scanned ones so the budget is met exactly.

    The continuous relaxation of the allocation: the optimum lies on a hull segment, at the
    point where the budget binds. Savings are linear in the level for parameters, FLOPs and
    size, and the damage is interpolated linearly between the two measured points. The unit
    moved is the one whose last segment costs the most damage per unit of saving.
    """
    excess = saved - required
    best = None
    for unit, i in chosen.items():
        if i == 0:
            continue
        (x0, y0, l0), (x1, y1, l1) = points[unit][i - 1], points[unit][i]
        slope = (y1 - y0) / (x1 - x0)
        if x1 - x0 > excess and (best is None or slope > best[0]):
            best = (slope, unit, x0, y0, l0, x1, y1, l1)
    if best is None:
        return saved, damage
    _, unit, x0, y0, l0, x1, y1, l1 = best
    t = (x1 - excess - x0) / (x1 - x0)  # the share of the segment still needed
    levels[unit] = l0 + t * (l1 - l0)
    return required, damage - (1 - t) * (y1 - y0)
