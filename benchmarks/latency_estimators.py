"""Which latency-ratio estimator reproduces best between processes on a busy machine?

Times EfficientNet-Lite0 dense vs structurally pruned (ratio 0.35, as examples/efficientnet_report.py)
at batch 1 with `prunekit.measure_latency` in N separate processes, keeps every per-call time,
and computes several speed-up estimators on the same samples: ratio of medians (what the
report uses), ratio of 25th percentiles, median of per-pair ratios (calls alternate A B, B A),
and the median of per-block speed-ups. Prints each estimator per run and its largest
relative change between runs.

Run:  python benchmarks/latency_estimators.py --runs 2 --repeats 40
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    k = (len(ordered) - 1) * q
    lo = int(k)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


def estimators(base: list[float], pruned: list[float], blocks: int = 4) -> dict[str, float]:
    size = len(base) // blocks
    block = [statistics.median(base[i:i + size]) / statistics.median(pruned[i:i + size])
             for i in range(0, size * blocks, size)]
    return {
        "median ratio": statistics.median(base) / statistics.median(pruned),
        "p25 ratio": _quantile(base, 0.25) / _quantile(pruned, 0.25),
        "paired median": statistics.median(b / p for b, p in zip(base, pruned, strict=True)),
        "block median": statistics.median(block),
    }


def measure(repeats: int, batch: int) -> None:
    sys.path.insert(0, str(ROOT / "examples"))
    import torch
    from efficientnet_report import build_model

    import prunekit as pk
    from prunekit.measure.bench import measure_latency

    torch.set_num_threads(1)
    dense = build_model()
    small = build_model()
    plan = pk.plan(small, pk.ChannelConfig(ratio=0.35, round_to=8, exclude=["_fc"]),
                   example_inputs=torch.randn(1, 3, 224, 224))
    plan.apply(small)
    x = torch.randn(batch, 3, 224, 224)
    res = measure_latency({"dense": dense, "pruned": small}, x, repeats=repeats, warmup=5)
    print(json.dumps({"dense": list(res["dense"].times_ms), "pruned": list(res["pruned"].times_ms),
                      "load": os.getloadavg()[0]}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=40)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        measure(args.repeats, args.batch)
        return
    runs = []
    for _ in range(args.runs):
        out = subprocess.run([sys.executable, __file__, "--child", "--repeats", str(args.repeats), "--batch",
                              str(args.batch)], check=True, capture_output=True, text=True).stdout
        runs.append(json.loads(out.strip().splitlines()[-1]))
    table = [estimators(r["dense"], r["pruned"]) for r in runs]
    print(f"batch {args.batch}, {args.repeats} interleaved calls per model, loads "
          + ", ".join(f"{r['load']:.1f}" for r in runs))
    for name in table[0]:
        values = [t[name] for t in table]
        spread = max(values) / min(values) - 1
        print(f"{name:>14}: " + "  ".join(f"{v:.3f}x" for v in values) + f"   spread {spread:.1%}")


if __name__ == "__main__":
    main()
