"""Sensitivity-allocated vs uniform channel pruning at 50 % FLOPs on the MNIST residual CNN.

For each seed: train the residual CNN of `structured_mnist.py`, scan each coupled channel group
(`ChannelConfig`, accuracy on 2k held-out training images after re-estimating BatchNorm
statistics on 8 training batches), and compare at the same measured
FLOPs reduction: `prunekit.allocate(table, FlopsTarget(0.5))` (per-group ratios, re-targeted
until the *measured* reduction reaches the budget, since coupled groups do not add up exactly)
against one uniform ratio for every group (bisected to the same measured reduction). Both are
fine-tuned with the same batches and steps; MNIST test accuracy is reported.

    OMP_NUM_THREADS=1 python benchmarks/sensitivity_cnn.py              # 3 seeds
    OMP_NUM_THREADS=1 python benchmarks/sensitivity_cnn.py --seeds 1 --width 16
"""

from __future__ import annotations

import argparse
import copy
import itertools
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Subset

import prunekit as pk
from prunekit.zoo.data import load_mnist

sys.path.insert(0, str(Path(__file__).resolve().parent))
from structured_mnist import ResidualCNN  # noqa: E402

LEVELS = (0.125, 0.25, 0.375, 0.5, 0.75)


def _reduction(dense: torch.nn.Module, pruned: torch.nn.Module, x: torch.Tensor) -> float:
    return 1 - pk.count_flops(pruned, x) / pk.count_flops(dense, x)


def _uniform(dense: torch.nn.Module, x: torch.Tensor, budget: float) -> tuple[torch.nn.Module, float]:
    lo, hi = 0.0, 0.9
    for _ in range(8):  # bisect the one ratio that removes `budget` of the FLOPs
        mid = (lo + hi) / 2
        plan = pk.plan(dense, pk.ChannelConfig(ratio=mid), x)
        if 1 - plan.stats["flops_after"] / plan.stats["flops_before"] >= budget:
            hi = mid
        else:
            lo = mid
    plan = pk.plan(dense, pk.ChannelConfig(ratio=hi), x)
    return plan.apply(copy.deepcopy(dense)), hi


def _allocated(dense: torch.nn.Module, table: pk.SensitivityTable, x: torch.Tensor, budget: float):
    goal = budget
    for _ in range(5):  # the additive prediction overestimates coupled savings: aim higher
        allocation = pk.allocate(table, pk.FlopsTarget(reduction=min(goal, 0.95)))
        pruned = allocation.apply(copy.deepcopy(dense), x)  # apply mutates: keep the dense model
        measured = _reduction(dense, pruned, x)
        if measured >= budget - 0.005:
            break
        goal += budget - measured
    return pruned, allocation


def _bn_recalibrated(model: torch.nn.Module, batches: list) -> torch.nn.Module:
    """A copy with BatchNorm statistics re-estimated on a few training batches.

    Removing channels shifts the statistics every later BatchNorm saw, so a pruned CNN
    evaluated with its old statistics scores near chance whatever was removed, and the scan
    would learn nothing (the "adaptive BN" evaluation of Li et al. 2020, "EagleEye").
    """
    model = copy.deepcopy(model)
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.reset_running_stats()
            m.momentum = None  # a plain average over the calibration batches
    model.train()
    with torch.no_grad():
        for x, _ in batches:
            model(x)
    return model.eval()


def _tune(model: torch.nn.Module, train: DataLoader, steps: int, seed: int) -> None:
    torch.manual_seed(seed)
    pk.finetune(model, itertools.islice(itertools.cycle(train), steps), epochs=1, lr=1e-3, progress=False)


def run_seed(seed: int, args: argparse.Namespace) -> dict[str, float]:
    torch.manual_seed(seed)
    full = load_mnist("train")
    order = torch.randperm(len(full), generator=torch.Generator().manual_seed(seed)).tolist()
    train = DataLoader(Subset(full, order[:55000]), batch_size=128, shuffle=True)
    val = DataLoader(Subset(full, order[55000:55000 + args.val]), batch_size=500)
    test = DataLoader(load_mnist("test"), batch_size=1000)
    x = torch.zeros(1, 1, 28, 28)

    t0 = time.perf_counter()
    dense = ResidualCNN(args.width)
    _tune(dense, train, args.train_steps, seed)
    dense.eval()
    out = {"dense": pk.accuracy(dense, test)}
    calib = list(itertools.islice(iter(train), args.calib_batches))
    table = pk.sensitivity(dense, pk.ChannelConfig(ratio=0.5),
                           lambda m: pk.accuracy(_bn_recalibrated(m, calib), val), LEVELS, example_inputs=x)
    allocated, allocation = _allocated(dense, table, x, args.budget)
    uniform, ratio = _uniform(dense, x, args.budget)
    print(f"seed {seed}: dense {out['dense']:.4f}; allocation "
          + ", ".join(f"{u}: {lv:.2f}" for u, lv in allocation.levels.items()) + f"; uniform ratio {ratio:.3f}",
          flush=True)
    for name, model in (("allocated", allocated), ("uniform", uniform)):
        out[f"{name}_flops_reduction"] = _reduction(dense, model, x)
        out[f"{name}_oneshot_bn"] = pk.accuracy(_bn_recalibrated(model, calib), test)
        _tune(model, train, args.finetune_steps, seed)
        out[name] = pk.accuracy(model, test)
    print(f"seed {seed}: " + ", ".join(f"{k} {v:.4f}" for k, v in out.items())
          + f" ({time.perf_counter() - t0:.0f} s)", flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--budget", type=float, default=0.5, help="fraction of FLOPs to remove")
    parser.add_argument("--width", type=int, default=32)
    parser.add_argument("--train-steps", type=int, default=400, help="dense training batches of 128")
    parser.add_argument("--finetune-steps", type=int, default=100, help="batches of 128 after pruning")
    parser.add_argument("--val", type=int, default=2000, help="held-out images for the scan")
    parser.add_argument("--calib-batches", type=int, default=8, help="batches re-estimating BatchNorm per probe")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    results = [run_seed(seed, args) for seed in range(args.seeds)]
    print(f"\nMNIST residual CNN (width {args.width}), {args.budget:.0%} FLOPs removed, {args.finetune_steps} "
          f"fine-tuning steps, mean ± stdev over {args.seeds} seeds (MNIST test accuracy):")
    for key in results[0]:
        values = [r[key] for r in results]
        spread = statistics.stdev(values) if len(values) > 1 else 0.0
        print(f"  {key:<28} {statistics.mean(values):.4f} ± {spread:.4f}")


if __name__ == "__main__":
    main()
