"""ONNX sparse initializers: file size and onnxruntime latency, dense-initializer vs sparse-initializer file.

Two 90 %-sparse models, nothing trained: the demo's LeNet-300-100 (global magnitude pruning) and
the pretrained EfficientNet-Lite0 of `examples/efficientnet_report.py` (90 % of every conv and
Linear weight, per layer). Each is exported twice with `prunekit.export_onnx` (checked both
times: zeros, shapes, outputs against PyTorch), once with `sparse_initializers=True`, and both
files are timed in onnxruntime at batch 1 (1 thread, interleaved, medians after warm-up).
onnxruntime densifies sparse initializers when it loads a file, so the latencies should match;
the point of the option is the file size.

Run:  python benchmarks/export_sparse_onnx.py [--repeats 50] [--skip-effnet]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch
from _timing import timed  # benchmarks/ is on sys.path when a script runs
from torch import nn

import prunekit as pk
from prunekit.zoo.models import lenet_300_100


def _effnet() -> nn.Module:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
    from efficientnet_report import build_model

    return build_model()


def models(skip_effnet: bool) -> dict[str, tuple[nn.Module, torch.Tensor]]:
    """Name -> (90 %-sparse finalized model, batch-1 example input)."""
    torch.manual_seed(0)
    lenet = pk.prune(lenet_300_100().eval(), pk.UnstructuredConfig(sparsity=0.9, scope="global"))
    out = {"LeNet-300-100 90% (global)": (pk.finalize(lenet), torch.randn(1, 1, 28, 28))}
    if not skip_effnet:
        effnet = pk.prune(_effnet(), pk.UnstructuredConfig(sparsity=0.9, scope="layer"))
        out["EfficientNet-Lite0 90% (per layer)"] = (pk.finalize(effnet), torch.randn(1, 3, 224, 224))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--skip-effnet", action="store_true")
    args = parser.parse_args()
    import onnxruntime as ort

    torch.set_num_threads(1)
    folder = Path(tempfile.mkdtemp(prefix="prunekit_sparse_onnx_"))
    for name, (model, x) in models(args.skip_effnet).items():
        t = time.perf_counter()
        dense = pk.export_onnx(model, folder / "dense.onnx", x, compress=False)
        sparse = pk.export_onnx(model, folder / "sparse.onnx", x, compress=False, sparse_initializers=True)
        options = ort.SessionOptions()
        options.intra_op_num_threads = options.inter_op_num_threads = 1
        sessions = {k: ort.InferenceSession(str(r.path), options, providers=["CPUExecutionProvider"])
                    for k, r in (("dense", dense), ("sparse", sparse))}
        feed = {sessions["dense"].get_inputs()[0].name: x.numpy()}
        ms = timed({k: (lambda s=s, f=feed: s.run(None, f)) for k, s in sessions.items()}, repeats=args.repeats)
        print(f"{name}: dense-initializer file {dense.size_bytes / 1e6:.2f} MB, sparse-initializer file "
              f"{sparse.size_bytes / 1e6:.2f} MB (ratio {sparse.size_bytes / dense.size_bytes:.3f}; "
              f"{len(sparse.sparse)} of {len(sparse.tensors)} checked weights stored sparse); "
              f"onnxruntime b1 p50 dense {ms['dense']:.2f} ms, sparse {ms['sparse']:.2f} ms; "
              f"both checks passed; {time.perf_counter() - t:.0f} s")


if __name__ == "__main__":
    main()
