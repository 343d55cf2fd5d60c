"""Cost of keeping masks attached during training: masked step time / dense step time.

Dense and masked copies of the same model are stepped alternately (interleaved) after warm-up;
the ratio of the medians is reported. Run: python benchmarks/mask_overhead.py
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
from torch import nn

import prunekit as pk
from prunekit.zoo.models import lenet_300_100


def step_time(model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor) -> float:
    t0 = time.perf_counter()
    loss = nn.functional.cross_entropy(model(x), y)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return time.perf_counter() - t0


def measure(name: str, dense: nn.Module, x: torch.Tensor, y: torch.Tensor, repeats: int, warmup: int) -> float:
    config = pk.UnstructuredConfig(sparsity=0.9, scope="layer")
    masked = copy.deepcopy(dense)
    pk.GradualPruner(masked, config, pk.OneShot()).step(0)
    ste = copy.deepcopy(dense)
    pk.GradualPruner(ste, config, pk.OneShot(), straight_through=True).step(0)
    models = [dense, masked, ste]
    opts = {m: torch.optim.Adam(m.parameters(), lr=1e-4) for m in models}
    times: dict[nn.Module, list[float]] = {m: [] for m in models}
    for i in range(warmup + repeats):
        for model in models if i % 2 == 0 else models[::-1]:
            t = step_time(model, opts[model], x, y)
            if i >= warmup:
                times[model].append(t)
    d, m, s = (statistics.median(times[k]) for k in models)
    print(f"| {name} | {x.shape[0]} | {1e3 * d:.3f} | {1e3 * m:.3f} | {m / d:.3f}x | {1e3 * s:.3f} | {s / d:.3f}x |")
    return m / d


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=300)
    parser.add_argument("--warmup", type=int, default=30)
    args = parser.parse_args()
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; medians of {args.repeats} steps")
    print("| model | batch | dense step ms | masked step ms | masked / dense | straight-through ms | ST / dense |")
    print("|---|---|---|---|---|---|---|")
    for batch in (128, 512):
        x, y = torch.rand(batch, 1, 28, 28), torch.randint(0, 10, (batch,))
        measure("LeNet-300-100", lenet_300_100(), x, y, args.repeats, args.warmup)
    wide = nn.Sequential(nn.Linear(1024, 4096), nn.ReLU(), nn.Linear(4096, 1024), nn.ReLU(), nn.Linear(1024, 10))
    x, y = torch.randn(128, 1024), torch.randint(0, 10, (128,))
    measure("MLP 1024-4096-1024-10", wide, x, y, args.repeats // 3, args.warmup)


if __name__ == "__main__":
    main()
