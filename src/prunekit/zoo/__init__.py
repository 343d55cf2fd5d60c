"""Real data and reference models that work offline: MNIST, text corpora, SmolLM2, small nets."""

from prunekit.zoo.models import lenet_300_100

__all__ = ["lenet_300_100"]
