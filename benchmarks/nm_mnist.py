"""Gradual vs one-shot N:M on MNIST LeNet-300-100: accuracy recovered by fine-tuning.

Train a dense LeNet-300-100, then, from the same dense weights and with the same number of
fine-tuning steps:
  * one-shot N:M: prune to N:M by magnitude at step 0, then fine-tune with the mask fixed;
  * gradual N:M: a `GradualPruner` walks the kept count down from M to N over the first
    part of fine-tuning (decaying masks, Kao et al. 2022), then fine-tunes with N:M fixed.
Every input dimension (784, 300, 100) divides by 4, so all three layers are pruned at 2:4
or 1:4; with m=8 only the first layer is (300 and 100 are not multiples of 8: skipped, logged).

    python benchmarks/nm_mnist.py                   # 2:4
    python benchmarks/nm_mnist.py --n 1 --m 4       # a harsher pattern shows the gap better
"""

from __future__ import annotations

import argparse
import copy
import time

import torch

import prunekit as pk
from prunekit.zoo.data import mnist_loaders
from prunekit.zoo.models import lenet_300_100


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=2)
    parser.add_argument("--m", type=int, default=4)
    parser.add_argument("--dense-epochs", type=int, default=2)
    parser.add_argument("--finetune-epochs", type=int, default=1)
    parser.add_argument("--ramp", type=float, default=0.5, help="share of fine-tuning spent ramping (gradual)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0, help="seeds the weights and the data order")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    train, test = mnist_loaders(batch_size=128, seed=args.seed)
    config = pk.NMConfig(n=args.n, m=args.m)

    t0 = time.perf_counter()
    dense = lenet_300_100()
    pk.finetune(dense, train, epochs=args.dense_epochs, lr=1e-3, progress=False)
    dense_acc = pk.accuracy(dense, test)
    print(f"dense: {dense_acc:.4f} ({time.perf_counter() - t0:.0f} s)", flush=True)
    steps = args.finetune_epochs * len(train)

    oneshot = pk.prune(copy.deepcopy(dense), config)
    oneshot_before = pk.accuracy(oneshot, test)
    pk.finetune(oneshot, train, epochs=args.finetune_epochs, lr=5e-4, progress=False)
    oneshot_after = pk.accuracy(oneshot, test)

    gradual = copy.deepcopy(dense)
    schedule = pk.Cubic(start_step=0, end_step=max(1, int(args.ramp * steps)), every=max(1, steps // 100))
    pruner = pk.GradualPruner(gradual, config, schedule)
    pk.finetune(gradual, train, epochs=args.finetune_epochs, lr=5e-4, pruner=pruner, progress=False)
    gradual_after = pk.accuracy(gradual, test)
    for name, model in (("one-shot", oneshot), ("gradual", gradual)):
        report = pk.check_nm(pk.finalize(model), args.n, args.m)
        if not report.ok:
            raise SystemExit(f"{name}: N:M pattern violated\n{report}")

    print(f"\n{args.n}:{args.m} on LeNet-300-100, {steps} fine-tuning steps each")
    print("| model | test accuracy |\n|---|---|")
    print(f"| dense | {dense_acc:.4f} |")
    print(f"| one-shot {args.n}:{args.m}, no fine-tuning | {oneshot_before:.4f} |")
    print(f"| one-shot {args.n}:{args.m} + fine-tuning | {oneshot_after:.4f} |")
    print(f"| gradual {args.n}:{args.m} (decaying mask) + fine-tuning | {gradual_after:.4f} |")
    print(f"total {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
