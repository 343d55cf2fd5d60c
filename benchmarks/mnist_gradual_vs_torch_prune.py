"""prunekit's gradual cubic schedule vs PyTorch's one-shot `global_unstructured`, same budget.

One dense LeNet-300-100 baseline is trained on MNIST; then, for each sparsity, both methods get
the same fine-tuning budget (epochs, optimizer, LR schedule, distillation from the baseline):
  * prunekit: `GradualPruner` + `Cubic` ramping 0 -> s over the first 60 % of fine-tuning;
  * torch:    `torch.nn.utils.prune.global_unstructured(L1Unstructured, amount=s)` once, then
              fine-tuning with its masks (forward pre-hooks) in place.
Prints test accuracy for both. Run: python benchmarks/mnist_gradual_vs_torch_prune.py
"""

from __future__ import annotations

import argparse
import copy
import time

import torch
import torch.nn.utils.prune as torch_prune

import prunekit as pk
from prunekit.zoo.data import mnist_loaders
from prunekit.zoo.models import lenet_300_100


def train(model, loader, epochs, lr, **kw):
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=epochs * len(loader))
    pk.finetune(model, loader, epochs=epochs, optimizer=opt, scheduler=sched, progress=False, **kw)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--levels", type=float, nargs="+", default=[0.9, 0.95, 0.98])
    parser.add_argument("--epochs", type=int, default=8, help="dense baseline epochs")
    parser.add_argument("--finetune-epochs", type=int, default=12)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    torch.manual_seed(args.seed)
    train_loader, test_loader = mnist_loaders(128, seed=args.seed)
    baseline = lenet_300_100()
    train(baseline, train_loader, args.epochs, args.lr)
    dense_acc = pk.accuracy(baseline, test_loader)
    print(f"dense baseline: {dense_acc:.2%}  (torch {torch.__version__}, {torch.get_num_threads()} threads)")
    kd = pk.KDLoss(temperature=4.0, alpha=0.7)
    steps = args.finetune_epochs * len(train_loader)

    rows = []
    for level in args.levels:
        torch.manual_seed(args.seed)
        ours = copy.deepcopy(baseline)
        pruner = pk.GradualPruner(ours, pk.UnstructuredConfig(sparsity=level),
                                  pk.Cubic(end_step=int(0.6 * steps), every=len(train_loader) // 4))
        t0 = time.perf_counter()
        train(ours, train_loader, args.finetune_epochs, args.lr, teacher=baseline, kd=kd, pruner=pruner)
        ours_s = time.perf_counter() - t0
        ours_acc, ours_sparsity = pk.accuracy(ours, test_loader), pk.sparsity(ours).total

        torch.manual_seed(args.seed)
        peer = copy.deepcopy(baseline)
        params = [(m, "weight") for m in peer.modules() if isinstance(m, torch.nn.Linear)]
        torch_prune.global_unstructured(params, pruning_method=torch_prune.L1Unstructured, amount=level)
        t0 = time.perf_counter()
        train(peer, train_loader, args.finetune_epochs, args.lr, teacher=baseline, kd=kd)
        peer_s = time.perf_counter() - t0
        peer_acc, peer_sparsity = pk.accuracy(peer, test_loader), pk.sparsity(peer).total
        rows.append((level, ours_acc, ours_sparsity, ours_s, peer_acc, peer_sparsity, peer_s))
        print(f"{level:.0%}: prunekit {ours_acc:.2%} ({ours_sparsity:.2%} sparse, {ours_s:.0f}s)  "
              f"torch one-shot {peer_acc:.2%} ({peer_sparsity:.2%} sparse, {peer_s:.0f}s)", flush=True)

    print("\n| sparsity | prunekit gradual (cubic) + KD | torch global_unstructured one-shot + KD | difference |")
    print("|---|---|---|---|")
    for level, oa, _, _, pa, _, _ in rows:
        print(f"| {level:.0%} | {oa:.2%} | {pa:.2%} | {100 * (oa - pa):+.2f} pts |")
    print(f"\ndense baseline {dense_acc:.2%}; fine-tuning budget {args.finetune_epochs} epochs for both")


if __name__ == "__main__":
    main()
