"""MNIST residual CNN: remove >= 50 % of FLOPs structurally, fine-tune with distillation,
and compare test accuracy with the dense model (target: within 0.5 points).

The dense baseline trains for `--epochs` (default 4, cosine-decayed lr; the per-epoch test
accuracy it prints shows whether it converged); the pruned model then
gets `--rounds` rounds of one fine-tuning epoch each, distilling from the dense model.
Run: python benchmarks/structured_mnist.py [--epochs 4] [--rounds 3] [--ratio 0.4] [--threads 2]
"""

from __future__ import annotations

import argparse
import copy
import os
import time

import torch
from torch import Tensor, nn

import prunekit
from prunekit.train.iterative import prune_iteratively
from prunekit.zoo.data import mnist_loaders


class ResidualCNN(nn.Module):
    """Two stages of residual blocks (BatchNorm, adds) with downsampling; ~99 % on MNIST."""

    def __init__(self, width: int = 32) -> None:
        super().__init__()
        w = width
        self.stem = nn.Sequential(nn.Conv2d(1, w, 3, padding=1), nn.BatchNorm2d(w), nn.ReLU(), nn.MaxPool2d(2))
        self.block1 = nn.Sequential(
            nn.Conv2d(w, w, 3, padding=1),
            nn.BatchNorm2d(w),
            nn.ReLU(),
            nn.Conv2d(w, w, 3, padding=1),
            nn.BatchNorm2d(w),
        )
        self.down = nn.Sequential(nn.Conv2d(w, 2 * w, 3, stride=2, padding=1), nn.BatchNorm2d(2 * w), nn.ReLU())
        self.block2 = nn.Sequential(
            nn.Conv2d(2 * w, 2 * w, 3, padding=1),
            nn.BatchNorm2d(2 * w),
            nn.ReLU(),
            nn.Conv2d(2 * w, 2 * w, 3, padding=1),
            nn.BatchNorm2d(2 * w),
        )
        self.head = nn.Linear(2 * w, 10)

    def forward(self, x: Tensor) -> Tensor:
        x = self.stem(x)
        x = torch.relu(x + self.block1(x))
        x = self.down(x)
        x = torch.relu(x + self.block2(x))
        return self.head(x.mean(dim=(2, 3)))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--epochs", type=int, default=4, help="dense training epochs (cosine lr)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--ratio", type=float, default=0.4)
    parser.add_argument("--width", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    train, test = mnist_loaders(batch_size=256)
    model = ResidualCNN(width=args.width)
    start = time.perf_counter()
    # Cosine-decayed Adam: the baseline should be converged, not left noisy by a constant lr.
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    cosine = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=args.epochs * len(train))

    def dense_epoch(epoch: int, step: int, loss: float) -> None:  # shows whether the baseline converged
        acc = prunekit.accuracy(model, test)
        print(f"dense epoch {epoch + 1}: loss {loss:.4f}, test accuracy {acc:.4f}", flush=True)

    prunekit.finetune(
        model, train, epochs=args.epochs, optimizer=opt, scheduler=cosine, callback=dense_epoch, progress=False
    )
    dense_acc = prunekit.accuracy(model, test)
    print(f"dense: test accuracy {dense_acc:.4f} ({time.perf_counter() - start:.0f} s)", flush=True)
    x = torch.randn(1, 1, 28, 28)
    dense = copy.deepcopy(model).eval()
    config = prunekit.ChannelConfig(ratio=args.ratio, exclude=["head"])

    def report(r: int, m: torch.nn.Module, plan: prunekit.ChannelPlan) -> None:
        flops = prunekit.count_flops(m, x) / prunekit.count_flops(dense, x)
        print(f"round {r + 1}: FLOPs {flops:.1%} of dense, test accuracy {prunekit.accuracy(m, test):.4f}", flush=True)

    pruned, _ = prune_iteratively(
        model,
        config,
        x,
        train,
        rounds=args.rounds,
        epochs=1,
        lr=1e-3,
        teacher=dense,
        kd=prunekit.KDLoss(temperature=4.0, alpha=0.5),
        callback=report,
    )
    acc = prunekit.accuracy(pruned, test)
    flops = prunekit.count_flops(pruned, x) / prunekit.count_flops(dense, x)
    params = prunekit.count_params(pruned) / prunekit.count_params(dense)
    print(
        f"pruned: FLOPs {flops:.1%}, params {params:.1%} of dense; accuracy {acc:.4f} vs dense {dense_acc:.4f} "
        f"(delta {100 * (acc - dense_acc):+.2f} points; target within 0.5: {abs(acc - dense_acc) <= 0.005}); "
        f"{args.epochs} dense epochs + {args.rounds} fine-tuning epochs, {time.perf_counter() - start:.0f} s wall, "
        f"load average {os.getloadavg()[0]:.1f}"
    )


if __name__ == "__main__":
    main()
