"""Static INT8 (onnxruntime, calibrated) on a pruned MNIST conv net: accuracy, size, latency.

A small Conv-BN-ReLU net is trained on MNIST, pruned to 70 % (global magnitude) and fine-tuned,
then quantized with `prunekit.quantize(..., StaticInt8Config(), data=...)` (per-channel
symmetric int8 weights, so zeros stay zero; uint8 activations calibrated with MinMax on 16
training batches). Reported: test accuracy, ONNX file and zip sizes, and onnxruntime latency
(1 thread, interleaved, medians after warm-up) at batch 1 and 64, fp32 against INT8.

Run:  python benchmarks/export_static_int8.py [--epochs 1]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

import prunekit as pk
from prunekit.zoo.data import mnist_loaders


def small_cnn() -> nn.Module:
    def block(i: int, o: int) -> list[nn.Module]:
        return [nn.Conv2d(i, o, 3, padding=1, bias=False), nn.BatchNorm2d(o), nn.ReLU(), nn.MaxPool2d(2)]

    return nn.Sequential(*block(1, 16), *block(16, 32), *block(32, 64), nn.Flatten(), nn.Linear(64 * 3 * 3, 10))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=50)
    args = parser.parse_args()
    import onnxruntime as ort

    torch.manual_seed(0)
    torch.set_num_threads(1)
    train, test = mnist_loaders(batch_size=128)
    model = small_cnn()
    pk.finetune(model, train, epochs=args.epochs, lr=2e-3, progress=False)
    pk.prune(model, pk.UnstructuredConfig(sparsity=0.7))
    pk.finetune(model, train, epochs=args.epochs, lr=5e-4, progress=False)
    pk.finalize(model.eval())
    int8 = pk.quantize(model, pk.StaticInt8Config(calibration_batches=16), data=train)
    acc = {"fp32 70%": pk.accuracy(model, test), "int8 70%": pk.accuracy(int8, test)}
    print("accuracy:", {k: f"{100 * v:.2f}" for k, v in acc.items()})
    folder = Path(tempfile.mkdtemp(prefix="prunekit_static_"))
    x, _ = next(iter(test))
    sessions = {}
    for name, m in (("fp32 70%", model), ("int8 70%", int8)):
        report = pk.export_onnx(m, folder / f"{name.split()[0]}.onnx", x[:8], data=test, max_batches=1)
        print(f"{name}: ONNX {report.size_bytes:,} B, zip {report.zip_bytes:,} B; weights "
              + ", ".join(f"{t.name} {t.onnx_sparsity:.0%}" for t in report.tensors))
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        sessions[name] = ort.InferenceSession(str(report.path), options, providers=["CPUExecutionProvider"])
    for batch in (1, 64):
        feed = x[:batch].numpy()
        times: dict[str, list[float]] = {k: [] for k in sessions}
        for i in range(args.repeats + 5):
            for k, s in sessions.items():
                t = time.perf_counter()
                s.run(None, {s.get_inputs()[0].name: feed})
                if i >= 5:
                    times[k].append((time.perf_counter() - t) * 1e3)
        print(f"onnxruntime batch {batch}, median ms:", {k: round(statistics.median(v), 3) for k, v in times.items()})


if __name__ == "__main__":
    main()
