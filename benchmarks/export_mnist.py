"""Compound compression on MNIST LeNet-300-100: 90 % sparse + INT8 against the dense fp32 file.

Trains the dense 784-300-100-10 MLP, prunes it to 90 % (global magnitude, cubic schedule,
fine-tuned), quantizes it to dynamic INT8 (per-channel symmetric, zeros kept), and measures
accuracy, bytes on disk (`prunekit.save` checkpoints, the dense fp32 safetensors file, the
checked ONNX export and its zip/xz sizes) and CPU latency (interleaved, medians after warm-up).

Target: 90 % + INT8 <= 1/20 of the dense fp32 file, accuracy within 0.5 points of the 90 %
fp32 model. Reference: Han et al. 2016 (Deep Compression) reach ~1/40 on this network with
pruning + 5-bit weight sharing + Huffman coding.

Run:  python benchmarks/export_mnist.py [--epochs 3 --finetune-epochs 4] [--out bench_out/mnist]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import torch

import prunekit as pk
from prunekit.storage.files import atomic_write_text
from prunekit.zoo.data import mnist_loaders
from prunekit.zoo.models import lenet_300_100


def dense_fp32_bytes(model: torch.nn.Module, path: Path) -> int:
    """Size of the plain safetensors file of the dense fp32 weights (the baseline)."""
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path.stat().st_size


def latency_ms(models: dict[str, torch.nn.Module], batch: int, repeats: int = 200) -> dict[str, float]:
    """Median ms per forward at `batch`, models interleaved so CPU noise hits all alike."""
    x = torch.rand(batch, 1, 28, 28)
    times: dict[str, list[float]] = {k: [] for k in models}
    with torch.inference_mode():
        for _ in range(20):
            for m in models.values():
                m(x)
        for _ in range(repeats):
            for k, m in models.items():
                t = time.perf_counter()
                m(x)
                times[k].append((time.perf_counter() - t) * 1e3)
    return {k: statistics.median(v) for k, v in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--finetune-epochs", type=int, default=4)
    parser.add_argument("--sparsity", type=float, default=0.9)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(1)
    out = args.out or Path(tempfile.mkdtemp(prefix="prunekit_mnist_"))
    out.mkdir(parents=True, exist_ok=True)
    train, test = mnist_loaders(batch_size=128)

    dense = lenet_300_100()
    pk.finetune(dense, train, epochs=args.epochs, lr=2e-3, progress=False)
    acc_dense = pk.accuracy(dense, test)

    import copy

    sparse = copy.deepcopy(dense)
    steps = len(train) * args.finetune_epochs
    pruner = pk.GradualPruner(sparse, pk.UnstructuredConfig(sparsity=args.sparsity),
                              schedule=pk.Cubic(start_step=0, end_step=int(steps * 0.6), every=50))
    pruner.step(0)
    pk.finetune(sparse, train, epochs=args.finetune_epochs, lr=1e-3, teacher=dense,
                kd=pk.KDLoss(temperature=4.0, alpha=0.7), pruner=pruner, progress=False)
    pk.finalize(sparse)
    acc_sparse = pk.accuracy(sparse, test)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        int8 = pk.quantize(sparse, pk.DynamicInt8Config())
    acc_int8 = pk.accuracy(int8, test)

    dense_bytes = dense_fp32_bytes(dense, out / "dense_fp32.safetensors")
    sparse_save = pk.save(sparse, out / "sparse_fp32.safetensors")
    int8_save = pk.save(int8, out / "sparse_int8.safetensors")
    x_test, _ = next(iter(test))
    onnx_fp32 = pk.export_onnx(sparse, out / "sparse_fp32.onnx", x_test[:8], data=test)
    onnx_int8 = pk.export_onnx(int8, out / "sparse_int8.onnx", x_test[:8], data=test)

    # Reload the INT8 checkpoint into a fresh quantized model: the file alone restores it.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fresh = pk.quantize(lenet_300_100(), pk.DynamicInt8Config())
    pk.load(out / "sparse_int8.safetensors", fresh)
    acc_reloaded = pk.accuracy(fresh, test)

    lat = {b: latency_ms({"dense_fp32": dense.eval(), "sparse_fp32": sparse.eval(), "sparse_int8": int8}, b)
           for b in (1, 128)}
    result = {
        "machine": "see report; torch threads = 1",
        "sparsity": float(pk.sparsity(sparse)),
        "accuracy": {"dense_fp32": acc_dense, "sparse_fp32": acc_sparse, "sparse_int8": acc_int8,
                     "sparse_int8_reloaded": acc_reloaded},
        "accuracy_drop_int8_points": 100 * (acc_sparse - acc_int8),
        "bytes": {"dense_fp32_safetensors": dense_bytes, "sparse_fp32_prunekit": sparse_save.size_bytes,
                  "sparse_int8_prunekit": int8_save.size_bytes, "onnx_fp32": onnx_fp32.size_bytes,
                  "onnx_fp32_zip": onnx_fp32.zip_bytes, "onnx_int8": onnx_int8.size_bytes,
                  "onnx_int8_zip": onnx_int8.zip_bytes, "onnx_int8_xz": onnx_int8.lzma_bytes},
        "ratio_vs_dense": {
            "sparse_fp32_prunekit": dense_bytes / sparse_save.size_bytes,
            "sparse_int8_prunekit": dense_bytes / int8_save.size_bytes,
            "onnx_int8_zip": dense_bytes / onnx_int8.zip_bytes,
            "onnx_int8_xz": dense_bytes / onnx_int8.lzma_bytes,
        },
        "bytes_per_param_int8": int8_save.bytes_per_param,
        "latency_ms_p50": {str(b): v for b, v in lat.items()},
        "onnx_check": {"fp32_max_abs_diff": onnx_fp32.max_abs_diff,
                       "int8_max_abs_diff": onnx_int8.max_abs_diff},
    }
    text = json.dumps(result, indent=2)
    print(text)
    atomic_write_text(out / "export_mnist.json", text)
    print(f"\n90% + INT8 file is 1/{dense_bytes / int8_save.size_bytes:.1f} of dense fp32 "
          f"(target <= 1/20); accuracy {100 * acc_int8:.2f} vs {100 * acc_sparse:.2f} fp32 90%")


if __name__ == "__main__":
    main()
