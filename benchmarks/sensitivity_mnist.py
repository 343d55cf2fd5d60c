"""Sensitivity-allocated vs uniform 90 % sparsity on MNIST LeNet-300-100, averaged over seeds.

For each seed: train a dense LeNet-300-100 on 55k MNIST training images, scan every layer's
sensitivity (accuracy on the 5k held-out training images, never the test set), let
`prunekit.allocate` choose per-layer sparsities for 90 % global parameter sparsity, and compare
with uniform allocation (every layer at 90 %, `scope="layer"`), both one-shot magnitude pruning
from the same dense weights followed by the same short fine-tuning (same batches, same steps).
Global magnitude ranking (`scope="global"`) is printed as a reference point.

    OMP_NUM_THREADS=1 python benchmarks/sensitivity_mnist.py                # 3 seeds
    OMP_NUM_THREADS=1 python benchmarks/sensitivity_mnist.py --metric loss          # scan the val loss
"""

from __future__ import annotations

import argparse
import copy
import itertools
import statistics
import time

import torch
from torch.utils.data import DataLoader, Subset

import prunekit as pk
from prunekit.zoo.data import load_mnist
from prunekit.zoo.models import lenet_300_100

LEVELS = (0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.925, 0.95, 0.97, 0.98, 0.99)


def _tune(model: torch.nn.Module, train: DataLoader, steps: int, seed: int) -> None:
    torch.manual_seed(seed)  # the same shuffled batches for every variant
    batches = itertools.islice(itertools.cycle(train), steps)
    pk.finetune(model, batches, epochs=1, lr=5e-4, progress=False)


def run_seed(seed: int, args: argparse.Namespace) -> dict[str, float]:
    torch.manual_seed(seed)
    full = load_mnist("train")
    order = torch.randperm(len(full), generator=torch.Generator().manual_seed(seed)).tolist()
    train = DataLoader(Subset(full, order[:55000]), batch_size=128, shuffle=True)
    val = DataLoader(Subset(full, order[55000:]), batch_size=1000)
    test = DataLoader(load_mnist("test"), batch_size=1000)

    t0 = time.perf_counter()
    dense = lenet_300_100()
    pk.finetune(dense, train, epochs=args.dense_epochs, lr=1e-3, progress=False)
    out = {"dense": pk.accuracy(dense, test)}

    family = pk.UnstructuredConfig(sparsity=0.9, scope="layer")
    if args.metric == "accuracy":
        table = pk.sensitivity(dense, family, lambda m: pk.accuracy(m, val), LEVELS)
    else:  # mean cross-entropy on the held-out images: smoother than accuracy for mild damage
        table = pk.sensitivity(dense, family, pk.proxy_loss(val, n_batches=5), LEVELS, higher_is_better=False)
    allocation = pk.allocate(table, pk.SparsityTarget(sparsity=args.sparsity))
    print(f"seed {seed}: dense {out['dense']:.4f}; allocation {allocation.levels} "
          f"(predicted sparsity {allocation.achieved:.4f})", flush=True)
    variants = {
        "allocated": allocation.to_config(),
        "uniform": pk.UnstructuredConfig(sparsity=args.sparsity, scope="layer"),
        "global": pk.UnstructuredConfig(sparsity=args.sparsity, scope="global"),
    }
    for name, config in variants.items():
        model = pk.prune(copy.deepcopy(dense), config)
        out[f"{name}_oneshot"] = pk.accuracy(model, test)
        _tune(model, train, args.finetune_steps, seed)
        out[name] = pk.accuracy(model, test)
        out[f"{name}_sparsity"] = pk.sparsity(pk.finalize(model)).total
    print(f"seed {seed}: " + ", ".join(f"{k} {v:.4f}" for k, v in out.items())
          + f" ({time.perf_counter() - t0:.0f} s)", flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--sparsity", type=float, default=0.9)
    parser.add_argument("--dense-epochs", type=int, default=2)
    parser.add_argument("--finetune-steps", type=int, default=200, help="batches of 128 after pruning")
    parser.add_argument("--metric", choices=["accuracy", "loss"], default="accuracy",
                        help="what the sensitivity scan measures on the held-out images")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    results = [run_seed(seed, args) for seed in range(args.seeds)]
    print(f"\nLeNet-300-100, {args.sparsity:.0%} parameter sparsity, {args.finetune_steps} fine-tuning steps, "
          f"scan metric {args.metric}, "
          f"mean ± stdev over {args.seeds} seeds (MNIST test accuracy):")
    for key in results[0]:
        values = [r[key] for r in results]
        spread = statistics.stdev(values) if len(values) > 1 else 0.0
        print(f"  {key:<20} {statistics.mean(values):.4f} ± {spread:.4f}")


if __name__ == "__main__":
    main()
