"""Gradual pruning with distillation inside your own PyTorch loop (no framework needed).

A small CNN is trained on real MNIST, then pruned to 80 % with the cubic schedule while it
distils from its dense copy; the masks stay on through every optimizer step, and the result
is saved pickle-free. Run: python examples/gradual_pruning_loop.py  (about a minute on 2 cores)
"""

from __future__ import annotations

import copy

import torch
from torch import nn

import prunekit as pk
from prunekit.zoo.data import mnist_loaders


def build() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 16, 5), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 5), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(32 * 4 * 4, 64), nn.ReLU(), nn.Linear(64, 10),
    )


def main() -> None:
    torch.manual_seed(0)
    train, test = mnist_loaders(batch_size=128)
    model = build()
    pk.finetune(model, train, epochs=1, lr=2e-3)
    print(f"dense: {pk.accuracy(model, test):.2%}")

    teacher = copy.deepcopy(model).eval()
    steps = len(train)
    pruner = pk.GradualPruner(model, pk.UnstructuredConfig(sparsity=0.8, exclude=("0",)),  # keep the first conv
                              pk.Cubic(start_step=0, end_step=int(0.7 * steps), every=50))
    kd = pk.KDLoss(temperature=4.0, alpha=0.7)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    model.train()
    for step, (x, y) in enumerate(train, start=1):
        with torch.no_grad():
            soft = teacher(x)
        loss = kd(model(x), soft, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        pruner.step(step)  # explicit step: save pruner.state_dict() with your checkpoint to resume
    pk.finalize(model)
    print(f"pruned: {pk.accuracy(model, test):.2%}")
    print(pk.sparsity(model))
    print(pk.save(model, "out/examples/cnn_pruned.safetensors"))


if __name__ == "__main__":
    main()
