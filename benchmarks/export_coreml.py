"""Core ML `.mlpackage` sizes: dense vs pruned vs pruned + fp16 / INT8 / 4-bit palette, with the storage check.

Nothing is trained. Models:
- the demo's LeNet-300-100 at 90 % global magnitude sparsity (pruned weights stored as
  bitmask + non-zeros);
- the pretrained EfficientNet-Lite0 of `examples/efficientnet_report.py`, channel-pruned
  (35 % of every coupled group, L2, multiples of 8, classifier kept): a smaller dense model;
- the same EfficientNet-Lite0 at 90 % unstructured sparsity per layer (for comparison).
Each pruned package is written by `prunekit.deploy.coreml.export_coreml` and checked (every
pruned weight found as a `constexpr_sparse_to_dense` op with the model's zeros and values;
for INT8 / palettized weights, coremltools' joint sparse + quantized ops, values within the
quantization tolerance). INT8 (per-channel symmetric) and lut4 (4-bit k-means palette per
tensor) packages compute in fp16. A channel-pruned model has no zeros, so it is stored dense
(quantized where asked) and has no sparse weights to check.
Core ML cannot run on Linux, so there are no latencies here.

Run:  python benchmarks/export_coreml.py [--skip-effnet]
"""

from __future__ import annotations

import argparse
import copy
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

import prunekit as pk
from prunekit.deploy.coreml import export_coreml
from prunekit.zoo.models import lenet_300_100


def _effnet() -> nn.Module:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
    from efficientnet_report import build_model

    return build_model()


def _row(name: str, dense: nn.Module, pruned: nn.Module, x: torch.Tensor, folder: Path) -> None:
    t = time.perf_counter()
    base = export_coreml(dense, folder / "dense.mlpackage", x, sparse=False, compare_dense=False)
    sizes, checked = {}, {}
    for label, options in {"fp32": {}, "fp16": {"precision": "fp16"},
                           "int8": {"precision": "fp16", "quantize": "int8"},
                           "lut4": {"precision": "fp16", "quantize": "lut4"}}.items():
        report = export_coreml(pruned, folder / f"pruned_{label}.mlpackage", x, compare_dense=False, **options)
        sizes[label] = report.size_bytes
        worst = max((w.max_error for w in report.tensors), default=0.0)
        checked[label] = f"{len(report.tensors)} sparse weights checked (max rel. error {worst:.3g})"
    mb = 1e6
    cells = " | ".join(f"pruned {k} {v / mb:.2f} MB ({v / base.size_bytes:.3f})" for k, v in sizes.items())
    print(f"{name}: dense fp32 {base.size_bytes / mb:.2f} MB | {cells}; {time.perf_counter() - t:.0f} s")
    for label, line in checked.items():
        print(f"    check passed, {label}: {line}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--skip-effnet", action="store_true")
    args = parser.parse_args()
    torch.manual_seed(0)
    folder = Path(tempfile.mkdtemp(prefix="prunekit_coreml_"))
    lenet = lenet_300_100().eval()
    pruned = pk.prune(copy.deepcopy(lenet), pk.UnstructuredConfig(sparsity=0.9, scope="global"))
    _row("LeNet-300-100, 90% global", lenet, pruned, torch.randn(1, 1, 28, 28), folder)
    if args.skip_effnet:
        return
    x = torch.randn(1, 3, 224, 224)
    effnet = _effnet()
    plan = pk.plan(copy.deepcopy(effnet), pk.ChannelConfig(ratio=0.35, criterion="l2", round_to=8, exclude=["_fc"]), x)
    channels = plan.apply(copy.deepcopy(effnet)).eval()
    _row("EfficientNet-Lite0, 35% channels removed", effnet, channels, x, folder)
    sparse = pk.prune(copy.deepcopy(effnet), pk.UnstructuredConfig(sparsity=0.9, scope="layer"))
    _row("EfficientNet-Lite0, 90% unstructured per layer", effnet, sparse, x, folder)


if __name__ == "__main__":
    main()
