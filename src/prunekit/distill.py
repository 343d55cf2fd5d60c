"""Knowledge distillation (`KDLoss`) and a small fine-tuning loop that drives a pruner.

Hinton et al. 2015, "Distilling the Knowledge in a Neural Network": the student matches the
teacher's temperature-softened distribution as well as the hard labels; the soft targets
carry the dark knowledge a pruned network needs to recover.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from prunekit.errors import ConfigError

log = logging.getLogger(__name__)


class KDLoss(nn.Module):
    """alpha * T^2 * KL(softmax(t/T) || softmax(s/T)) + (1 - alpha) * CE(s, y).

    Args:
        temperature: softening temperature T > 0; the T^2 factor keeps gradient scales
            comparable across temperatures (Hinton et al. 2015).
        alpha: weight of the soft (teacher) term in [0, 1]; 0 is plain cross-entropy.

    Example:
        >>> kd = KDLoss(temperature=4.0, alpha=0.5)
        >>> loss = kd(torch.randn(8, 10), torch.randn(8, 10), torch.randint(0, 10, (8,)))
    """

    def __init__(self, temperature: float = 4.0, alpha: float = 0.5) -> None:
        super().__init__()
        if temperature <= 0:
            raise ConfigError(f"KDLoss.temperature must be > 0, got {temperature!r}")
        if not 0.0 <= alpha <= 1.0:
            raise ConfigError(f"KDLoss.alpha must be in [0, 1], got {alpha!r}")
        self.temperature, self.alpha = temperature, alpha

    def forward(self, student: Tensor, teacher: Tensor | None, target: Tensor) -> Tensor:
        hard = F.cross_entropy(student, target)
        if teacher is None or self.alpha == 0.0:
            return hard
        t = self.temperature
        soft = F.kl_div(
            F.log_softmax(student / t, dim=-1),
            F.log_softmax(teacher.detach() / t, dim=-1),
            reduction="batchmean",
            log_target=True,
        )
        return self.alpha * t * t * soft + (1.0 - self.alpha) * hard


def finetune(
    model: nn.Module,
    loader: Iterable[tuple[Tensor, Tensor]],
    *,
    epochs: int = 1,
    optimizer: torch.optim.Optimizer | None = None,
    lr: float = 1e-3,
    teacher: nn.Module | None = None,
    kd: KDLoss | None = None,
    pruner: Any = None,
    scheduler: Any = None,
    start_step: int = 0,
    callback: Callable[[int, int, float], None] | None = None,
    progress: bool = True,
) -> int:
    """Train `model` on `(x, y)` batches, distilling from `teacher` if given (mutates model).

    After every optimizer step it calls `pruner.step(step)` (a `GradualPruner`) and, at the
    end of each epoch, `callback(epoch, step, mean_loss)`.

    Returns:
        The global step after the last batch, to continue a schedule in another call.
    """
    optimizer = optimizer or torch.optim.Adam(model.parameters(), lr=lr)
    kd = kd or KDLoss(alpha=0.5 if teacher is not None else 0.0)
    if teacher is not None:
        teacher.eval()
    step = start_step
    for epoch in range(epochs):
        model.train()
        total, batches = 0.0, 0
        iterator = _progress(loader, f"epoch {epoch + 1}/{epochs}", progress)
        for x, y in iterator:
            with torch.no_grad():
                soft = teacher(x) if teacher is not None else None
            loss = kd(model(x), soft, y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if scheduler is not None:
                scheduler.step()
            step += 1
            if pruner is not None:
                pruner.step(step)
            total, batches = total + loss.item(), batches + 1
        mean = total / max(batches, 1)
        log.info("epoch %d: loss %.4f", epoch + 1, mean)
        if callback is not None:
            callback(epoch, step, mean)
    return step


def _progress(iterable: Iterable[Any], desc: str, enabled: bool) -> Iterable[Any]:
    if not enabled:
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, desc=desc, leave=False)


@torch.no_grad()
def accuracy(model: nn.Module, loader: Iterable[tuple[Tensor, Tensor]]) -> float:
    """Top-1 accuracy of `model` over `loader` (switches to eval mode)."""
    model.eval()
    correct = seen = 0
    for x, y in loader:
        correct += int((model(x).argmax(dim=-1) == y).sum())
        seen += len(y)
    return correct / max(seen, 1)
