"""How far a measured difference can be trusted: binomial and paired intervals for accuracy,
bootstrap intervals and the run's own spread for speed-ups, and the verdict words they allow."""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

Z95 = 1.959963984540054  # the normal quantile of a two-sided 95 % interval
BOOTSTRAP_RESAMPLES = 2000
MIN_TIMED_CALLS = 5  # fewer paired calls give no confidence interval (and no speed claim)

def wilson_interval(successes: int, n: int, z: float = Z95) -> list[float]:
    """The Wilson score interval of a binomial proportion (95 % by default); pure.

    Wilson (1927), "Probable inference, the law of succession, and statistical inference". It
    keeps its coverage near 0 and 1, where the normal (Wald) interval collapses to a point.

    Example:
        >>> [round(v, 4) for v in wilson_interval(90, 100)]
        [0.8256, 0.9448]
    """
    if n <= 0:
        return [0.0, 1.0]
    p, z2 = successes / n, z * z
    scale = 1 + z2 / n
    centre = (p + z2 / (2 * n)) / scale
    half = z / scale * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n))
    return [max(0.0, centre - half), min(1.0, centre + half)]


def paired_change(base_correct: Tensor, pruned_correct: Tensor, z: float = Z95) -> dict[str, Any]:
    """The accuracy change (pruned - baseline, in points) on the same examples, with a 95 % interval; pure.

    Only the discordant examples (one model right, the other wrong) carry information (McNemar,
    1947): the change is (gained - lost) / n with variance ((gained + lost) / n - change^2) / n.
    The interval adds Edwards' (1948) continuity correction of 1/n, which makes "beyond noise"
    agree with the exact McNemar test where counts are small (5 lost, 0 gained: not beyond).
    """
    n = max(int(base_correct.numel()), 1)
    gained = int((pruned_correct & ~base_correct).sum())
    lost = int((base_correct & ~pruned_correct).sum())
    diff = (gained - lost) / n
    half = (z * math.sqrt(max((gained + lost) / n - diff * diff, 0.0) / n) + 1 / n) if gained + lost else 0.0
    lo, hi = 100 * (diff - half), 100 * (diff + half)
    return {"points": 100 * diff, "ci95_points": [lo, hi], "beyond_noise": lo > 0 or hi < 0,
            "gained": gained, "lost": lost}


def bootstrap_interval(columns: Sequence[Sequence[float]], statistic: Callable[[list[Tensor]], Tensor], *,
                       resamples: int = BOOTSTRAP_RESAMPLES, seed: int = 0) -> list[float] | None:
    """A 95 % percentile-bootstrap interval of `statistic` of the columns' medians; pure, deterministic.

    Efron & Tibshirani (1993), "An Introduction to the Bootstrap", ch. 13. The timed calls are
    resampled as pairs (one index for all columns): load that slowed call i of one model slowed
    the interleaved call i of the other as well, and the pairing keeps that out of the ratio.

    Returns:
        [low, high], or None with fewer than `MIN_TIMED_CALLS` calls per column.
    """
    n = min(len(c) for c in columns)
    if n < MIN_TIMED_CALLS:
        return None
    index = torch.randint(n, (resamples, n), generator=torch.Generator().manual_seed(seed))
    medians = [torch.tensor(list(c[:n]), dtype=torch.float64)[index].quantile(0.5, dim=1) for c in columns]
    lo, hi = torch.quantile(statistic(medians), torch.tensor([0.025, 0.975], dtype=torch.float64))
    return [float(lo), float(hi)]


def speedup_interval(base_ms: Sequence[float], pruned_ms: Sequence[float]) -> list[float] | None:
    """95 % interval of the speed-up (baseline median / pruned median) from paired interleaved calls."""
    return bootstrap_interval([base_ms, pruned_ms], lambda m: m[0] / m[1])


def speed_call(interval: Sequence[float] | None, halves: Sequence[float] = (), spread: float = 0.0) -> str:
    """'faster', 'slower', 'no measurable difference' or 'undetermined' (no interval).

    The interval is widened to cover the speed-ups of the run's two halves (the bootstrap sees
    noise between calls, the halves see load that drifted during the run), and must then clear
    the run's own spread (`halves_spread`, the largest disagreement of two halves at any batch
    size): on a busy machine, where scheduling alone moves ratios by that much, only a larger
    difference is called.
    """
    if interval is None:
        return "undetermined"
    lo, hi = min([interval[0], *halves]), max([interval[1], *halves])
    return "faster" if lo > 1 + spread else "slower" if hi * (1 + spread) < 1 else "no measurable difference"


def speed_words(what: str, speedup: float, interval: Sequence[float] | None, halves: Sequence[float],
                calls: int, spread: float = 0.0) -> str:
    """The speed verdict of one measurement in words, e.g. 'faster at batch 1: yes (1.52x, 95 % CI 1.45-1.60)'."""
    call = speed_call(interval, halves, spread)
    if interval is None:
        return (f"{what}: undetermined ({speedup:.2f}x from {calls} timed calls; a confidence interval "
                f"needs at least {MIN_TIMED_CALLS})")
    lo, hi = min([interval[0], *halves]), max([interval[1], *halves])
    drift = (f", halves of the run {halves[0]:.2f}x and {halves[1]:.2f}x"
             if halves and not interval[0] <= min(halves) <= max(halves) <= interval[1] else "")
    ci = f"95 % CI {interval[0]:.2f}-{interval[1]:.2f}{drift}" + (f", run spread {spread:.1%}" if spread else "")
    if call == "faster":
        return f"{what}: yes ({speedup:.2f}x, {ci})"
    if call == "slower":
        return f"{what}: no, slower ({speedup:.2f}x, {ci})"
    noise = max(hi - speedup, speedup - lo) / speedup + spread
    pm = f"±{100 * noise:.1f} %" if noise < 1 else "± more than 100 %"
    return f"{what}: no measurable difference ({speedup:.2f}x, {pm}; {ci})"


def speedup_halves(base: Sequence[float], pruned: Sequence[float]) -> list[float]:
    """Speed-up (median over median) in the first and in the second half of the timed calls.

    How far the two halves disagree is the run's own estimate of how reproducible its ratios
    are: load that drifts within a run drifts between runs too.
    """
    half = min(len(base), len(pruned)) // 2
    if half < 3:
        return []
    first = statistics.median(base[:half]) / statistics.median(pruned[:half])
    second = statistics.median(base[half:]) / statistics.median(pruned[half:])
    return [first, second]
