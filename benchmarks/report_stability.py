"""Is the report's latency reproducible? `prunekit report` twice, in two processes, on one pair.

Issue 8's target: the latency numbers are stable to within 10 % between two runs (ratios).
Each run is a separate `python -m prunekit.cli report` process (fresh allocator, caches and
thread pool), one after the other on the same checkpoints; the script prints, per batch size,
both runs' p50s and pruned/baseline speed-ups and how far the second run is from the first,
with the load average beside each run (a shared machine is the usual source of drift).

Run (EfficientNet-Lite0 dense vs pruned; `python examples/efficientnet_report.py` first):
    flock /tmp/pk-timing.lock python benchmarks/report_stability.py --threads 1 --repeats 30
MNIST demo pair:
    python benchmarks/report_stability.py --model prunekit.zoo:lenet_300_100 --data prunekit.zoo.data:mnist_loaders \\
        --baseline out/demo/dense.safetensors --pruned out/demo/pruned.safetensors
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _load() -> str:
    return " ".join(f"{v:.1f}" for v in os.getloadavg())


def run_once(args: argparse.Namespace, out: Path) -> dict:
    cmd = [sys.executable, "-m", "prunekit.cli", "report", "--model", args.model, "--data", args.data,
           "--baseline", str(args.baseline), "--pruned", str(args.pruned), "--out", str(out),
           "--batch-sizes", args.batch_sizes, "--repeats", str(args.repeats), "--warmup", str(args.warmup),
           "--threads", str(args.threads)] + (["--no-retain-memory"] if args.no_retain_memory else [])
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT / "examples"),
                                                                       os.environ.get("PYTHONPATH")])))
    load_before, start = _load(), time.perf_counter()
    subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL)
    report = json.loads((out / "report.json").read_text())
    report["_wall_s"], report["_load"] = time.perf_counter() - start, f"{load_before} -> {_load()}"
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="efficientnet_report:build_model")
    parser.add_argument("--data", default="efficientnet_report:loaders")
    parser.add_argument("--baseline", type=Path, default=Path("out/effnet/dense.safetensors"))
    parser.add_argument("--pruned", type=Path, default=Path("out/effnet/pruned.safetensors"))
    parser.add_argument("--out", type=Path, default=Path("out/report_stability"))
    parser.add_argument("--batch-sizes", default="1,4,8,32")
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--threads", type=int, default=0, help="0: torch's default")
    parser.add_argument("--tolerance", type=float, default=0.10, help="allowed relative change of a speed-up")
    parser.add_argument("--no-retain-memory", action="store_true", help="time with glibc's default allocator")
    args = parser.parse_args()

    runs = [run_once(args, args.out / f"run{i}") for i in (1, 2)]
    for i, r in enumerate(runs, 1):
        lat = r["latency"]
        print(f"run {i}: {r['_wall_s']:.0f} s wall, load {r['_load']}, {lat['threads']} threads, "
              f"{lat['repeats']} repeats after {lat['warmup']} warm-up; the report's own estimate (halves of "
              f"the run): {lat.get('halves_spread') or 0:.1%}; allocator: {lat.get('allocator', '-')}")
        faults = [f"b{row['batch_size']} {row['page_faults_per_call'][0]:.0f}/{row['page_faults_per_call'][1]:.0f}"
                  for row in lat["by_batch"] if "page_faults_per_call" in row]
        if faults:
            print(f"       page faults per call (baseline/pruned): {', '.join(faults)}")
    print(f"{'batch':>5}  {'run1 base/pruned p50 ms':>24}  {'run2 base/pruned p50 ms':>24}  "
          f"{'speedup 1':>9}  {'speedup 2':>9}  {'change':>7}  {'p50 change base/pruned':>22}")
    worst = 0.0
    for a, b in zip(runs[0]["latency"]["by_batch"], runs[1]["latency"]["by_batch"], strict=True):
        change = b["speedup"] / a["speedup"] - 1
        worst = max(worst, abs(change))
        base_change = b["baseline_ms_p50"] / a["baseline_ms_p50"] - 1
        pruned_change = b["pruned_ms_p50"] / a["pruned_ms_p50"] - 1
        print(f"{a['batch_size']:>5}  {a['baseline_ms_p50']:>11.3f} / {a['pruned_ms_p50']:<10.3f}  "
              f"{b['baseline_ms_p50']:>11.3f} / {b['pruned_ms_p50']:<10.3f}  {a['speedup']:>8.3f}x  "
              f"{b['speedup']:>8.3f}x  {change:>+7.1%}  {base_change:>+10.1%} / {pruned_change:<+10.1%}")
    verdict = "within" if worst <= args.tolerance else "NOT within"
    print(f"largest speed-up change between the two runs: {worst:.1%} ({verdict} {args.tolerance:.0%})")


if __name__ == "__main__":
    main()
