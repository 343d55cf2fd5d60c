"""EfficientNet-Lite0: allocate a 1.5x target with a latency table from the "device" vs the host.

1. Bundle (`make_bundle`): every coupled channel group (`ChannelConfig`, L2, round_to 8, `_fc`
   kept) at ratios 0.25 and 0.5, as ONNX sub-models plus inputs (or `--groups N`: the first N).
2. "Device": `bundle_runner.py` in a separate process (onnxruntime, no torch imported), 1 thread.
   Host: `measure_latency_table` with torch, 2 threads.
3. Sensitivity: a proxy scan (KL from the dense model's predictions on 8 crops of matplotlib's
   sample photo) at the same ratios.
4. Allocate 1.5x with each table; print the groups whose levels differ.
5. Export both allocated models to ONNX and time them in the device process against the dense
   one (`bundle_runner.py --skip-units --extra ...`); if the device-allocated model misses 1.5x
   by more than 5 %, calibrate the device table on that point (`LatencyTable.calibrated`) and
   allocate again (up to --rounds).

    nice -n 10 python benchmarks/device_bundle_efficientnet.py [--groups 12] [--repeats 20]
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import prunekit as pk
from prunekit.allocation.bundle import RUNNER, make_bundle
from prunekit.allocation.device_table import load_device_table
from prunekit.allocation.latency import LatencyTable
from prunekit.allocation.sensitivity.groups import GroupPruner
from prunekit.deploy.onnx_export import DEFAULT_OPSET, onnx_bytes

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "examples"), str(ROOT / "benchmarks")]
from efficientnet_report import build_model  # noqa: E402
from export_efficientnet import photo_batches  # noqa: E402

LEVELS = [0.25, 0.5]
FAMILY = pk.ChannelConfig(ratio=0.3, criterion="l2", round_to=8, exclude=["_fc"])


def _load() -> str:
    return "load average " + " ".join(f"{v:.1f}" for v in os.getloadavg())


def device_run(bundle: Path, out: Path, threads: int, repeats: int, *extra: str) -> dict:
    """Run the runner as the device, in its own process; returns its results document."""
    cmd = [sys.executable, str(RUNNER), str(bundle), "--threads", str(threads), "--repeats", str(repeats),
           "--out", str(out), "--quiet", *extra]
    probe = f"import runpy, sys; sys.argv = {cmd[1:]!r}; runpy.run_path({str(RUNNER)!r}, run_name='__main__')"
    check = "\nassert 'torch' not in sys.modules and 'prunekit' not in sys.modules"
    subprocess.run([sys.executable, "-c", f"import sys\ntry:\n    {probe}\nexcept SystemExit:\n    pass{check}"],
                   check=True)
    return json.loads(out.read_text())


def sub_table(table: pk.SensitivityTable, units: list[str]) -> pk.SensitivityTable:
    """`table` restricted to some units (the others stay dense)."""
    return dataclasses.replace(table, units=units, values={u: table.values[u] for u in units},
                               params={u: table.params[u] for u in units},
                               removed=None if table.removed is None else
                               {k: {u: v[u] for u in units} for k, v in table.removed.items()})


def measured(dense: torch.nn.Module, allocations: dict[str, pk.Allocation], x: torch.Tensor, bundle: Path,
             out: Path, repeats: int) -> dict[str, float]:
    """Device-process speed-up (dense / allocated, ratio of min times) of each allocation."""
    extra = []
    for name, allocation in allocations.items():
        pruned = allocation.apply(copy.deepcopy(dense), x).eval()
        path = out / f"{name}.onnx"
        path.write_bytes(onnx_bytes(pruned, (x,), dynamic_batch=False, opset=DEFAULT_OPSET))
        extra += ["--extra", f"{name}={path}"]
    results = device_run(bundle, out / "whole.json", 1, repeats, "--skip-units", *extra)
    return {name: results["extra"][name]["speedup_min"] for name in allocations} | {
        f"{name} (median)": results["extra"][name]["speedup_median"] for name in allocations}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--groups", type=int, default=None, help="bundle only the first N groups")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--speedup", type=float, default=1.5)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=ROOT / "out" / "device_bundle_efficientnet")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    dense, x = build_model(), torch.randn(1, 3, 224, 224)
    groups = list(GroupPruner(dense, FAMILY, x).groups)
    chosen = groups if args.groups is None else groups[: args.groups]
    print(f"{len(groups)} groups, bundling {len(chosen)} [{_load()}]", flush=True)

    t0 = time.perf_counter()
    bundle = make_bundle(dense, FAMILY, LEVELS, x, args.out / "bundle", units=chosen, progress=True)
    size = sum(p.stat().st_size for p in bundle.rglob("*") if p.is_file())
    print(f"bundle: {time.perf_counter() - t0:.0f} s, {size / 2**20:.1f} MB", flush=True)
    t0 = time.perf_counter()
    results = device_run(bundle, args.out / "device_table.json", 1, args.repeats)
    device = load_device_table(bundle, args.out / "device_table.json", model=dense)
    print(f"device run (onnxruntime {results['device']['onnxruntime']}, 1 thread): {time.perf_counter() - t0:.0f} s; "
          f"dense {device.model_ms:.2f} ms; failures {results['failures']} [{_load()}]", flush=True)
    t0 = time.perf_counter()
    host = pk.measure_latency_table(dense, FAMILY, LEVELS, x, repeats=args.repeats, warmup=2, threads=2)
    print(f"host table (torch, 2 threads): {time.perf_counter() - t0:.0f} s; dense {host.model_ms:.2f} ms", flush=True)
    t0 = time.perf_counter()
    with torch.no_grad():
        probes = [(b, dense(b).log_softmax(-1)) for b in photo_batches(1, 8)]

    def kl(out: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        return F.kl_div(out.log_softmax(-1), teacher, log_target=True, reduction="batchmean")

    table = pk.sensitivity(dense, FAMILY, pk.proxy_loss(probes, n_batches=1, loss_fn=kl), LEVELS,
                           higher_is_better=False, example_inputs=x)
    table = sub_table(table, chosen)
    print(f"proxy scan: {time.perf_counter() - t0:.0f} s", flush=True)
    report(dense, table, device, host, x, bundle, args)


def report(dense: torch.nn.Module, table: pk.SensitivityTable, device: LatencyTable, host: LatencyTable,
           x: torch.Tensor, bundle: Path, args: argparse.Namespace) -> None:
    target = pk.LatencyTarget(speedup=args.speedup)
    on_host = pk.allocate(table, target, latency=host)
    for round_ in range(args.rounds):
        on_device = pk.allocate(table, target, latency=device)
        differ = {u: (on_device.levels[u], on_host.levels[u]) for u in table.units
                  if abs(on_device.levels[u] - on_host.levels[u]) > 1e-9}
        print(f"round {round_}: {len(differ)}/{len(table.units)} groups differ (device, host): "
              + ", ".join(f"{u} {d:.3f}/{h:.3f}" for u, (d, h) in differ.items()), flush=True)
        speed = measured(dense, {"device": on_device, "host": on_host}, x, bundle, args.out, 2 * args.repeats)
        print(f"round {round_}: measured in the device process (1 thread, min / median): device-allocated "
              f"{speed['device']:.3f}x / {speed['device (median)']:.3f}x (table predicted {on_device.achieved:.3f}x), "
              f"host-allocated {speed['host']:.3f}x / {speed['host (median)']:.3f}x [{_load()}]", flush=True)
        if abs(speed["device"] / args.speedup - 1) <= 0.05:
            print(f"device-allocated model meets {args.speedup}x within 5 % on the device", flush=True)
            return
        device = device.calibrated(on_device.achieved, speed["device"])
    print(f"not within 5 % after {args.rounds} rounds", flush=True)


if __name__ == "__main__":
    main()
