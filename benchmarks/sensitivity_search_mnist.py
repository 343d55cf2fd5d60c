"""Optuna search on MNIST LeNet-300-100: per-layer levels, schedule and distillation, measured.

Train a dense LeNet-300-100, then run `prunekit.search` (SQLite study in --out) for --trials
trials: each samples a sparsity per layer, the cubic schedule's length and the distillation
weight, prunes gradually while fine-tuning for --finetune-steps batches, and measures accuracy
on 5k held-out training images and batch-1 latency. Trials under --min-sparsity measured
parameter sparsity are infeasible. The best feasible trial is re-measured on the MNIST test set.
Run it again with the same --out to resume the study; point several at --storage
postgresql://... to share it.

    OMP_NUM_THREADS=1 python benchmarks/sensitivity_search_mnist.py --trials 12
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Subset

import prunekit as pk
from prunekit.zoo.data import load_mnist
from prunekit.zoo.models import lenet_300_100


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=12)
    parser.add_argument("--finetune-steps", type=int, default=200)
    parser.add_argument("--min-sparsity", type=float, default=0.9)
    parser.add_argument("--out", type=Path, default=Path("out/search_mnist"))
    parser.add_argument("--storage", default="")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    full = load_mnist("train")
    order = torch.randperm(len(full), generator=torch.Generator().manual_seed(0)).tolist()
    train = DataLoader(Subset(full, order[:55000]), batch_size=128, shuffle=True)
    val = DataLoader(Subset(full, order[55000:]), batch_size=1000)
    test = DataLoader(load_mnist("test"), batch_size=1000)
    dense = lenet_300_100()
    pk.finetune(dense, train, epochs=2, lr=1e-3, progress=False)
    print(f"dense test accuracy {pk.accuracy(dense, test):.4f}", flush=True)

    args.out.mkdir(parents=True, exist_ok=True)
    config = pk.SearchConfig(trials=args.trials, finetune_steps=args.finetune_steps, min_sparsity=args.min_sparsity,
                             levels=(0.5, 0.7, 0.8, 0.9, 0.95, 0.98), objectives=("accuracy", "latency_ms"),
                             study_name="lenet_mnist")
    t0 = time.perf_counter()
    result = pk.search(dense, pk.UnstructuredConfig(sparsity=0.9), train, lambda m: pk.accuracy(m, val),
                       torch.zeros(1, 1, 28, 28), config, storage=args.storage or f"sqlite:///{args.out / 'study.db'}")
    print(result.summary())
    feasible = [t for t in result.best if (t["measured"]["sparsity"] or 0) >= args.min_sparsity]
    if not feasible:
        print(f"no trial reached {args.min_sparsity:.0%} sparsity; raise --trials")
        return
    top = max(feasible, key=lambda t: t["measured"]["accuracy"])
    print(f"best feasible trial #{top['number']}: val accuracy {top['measured']['accuracy']:.4f}, "
          f"sparsity {top['measured']['sparsity']:.4f}, latency {top['measured']['latency_ms']:.4f} ms "
          f"({time.perf_counter() - t0:.0f} s for the study)")
    # re-run the best trial's recipe on the test set: same schedule and alpha, same steps
    from prunekit.allocation.search import _trial_model

    levels = {k: float(v) for k, v in top["levels"].items()}
    torch.manual_seed(0)
    model = _trial_model(dense, pk.UnstructuredConfig(sparsity=0.9), levels, config, top["schedule_end"],
                         top["alpha"], train)
    print(f"best trial re-trained: test accuracy {pk.accuracy(model, test):.4f}, "
          f"sparsity {pk.sparsity(model).total:.4f}")


if __name__ == "__main__":
    main()
