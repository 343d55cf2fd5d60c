"""Knowledge distillation (`KDLoss`) and a small fine-tuning loop that drives a pruner.

Hinton et al. 2015, "Distilling the Knowledge in a Neural Network": the student matches the
teacher's temperature-softened distribution as well as the hard labels; the soft targets
carry the dark knowledge a pruned network needs to recover.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from prunekit.core.progress import progress as progress_bar
from prunekit.errors import CheckpointError, ConfigError
from prunekit.storage.runstate import Checkpointer, check_same_run, loader_generators, rng_state, set_rng_state

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
    checkpoint_dir: str | Path | None = None,
    checkpoint_every: int = 100,
    resume: bool = False,
) -> int:
    """Train `model` on `(x, y)` batches, distilling from `teacher` if given (mutates model).

    After every optimizer step it calls `pruner.step(step)` (a `GradualPruner`) and, at the
    end of each epoch, `callback(epoch, step, mean_loss)`.

    Args:
        checkpoint_dir: folder for `finetune.ckpt.safetensors`, written atomically every
            `checkpoint_every` optimizer steps and at each epoch's end: the model (masks
            included), optimizer, scheduler and pruner states, the position in the loader and
            the RNG states (see `prunekit.storage.runstate`). None: no checkpoints.
        checkpoint_every: optimizer steps between checkpoints.
        resume: continue from the checkpoint in `checkpoint_dir` if there is one. Build the
            model, pruner, optimizer and loader as for the first run; with the same seeds on
            CPU the result is bit-identical to an uninterrupted run. `callback` is not called
            again for epochs that ended before the interruption.

    Returns:
        The global step after the last batch, to continue a schedule in another call.

    Raises:
        CheckpointError: `checkpoint_dir` holds a checkpoint but `resume` is False, or the
            checkpoint does not fit this model, optimizer or loader.
    """
    saver = Checkpointer(checkpoint_dir, "finetune", checkpoint_every, resume)
    loop = TrainLoop(model, loader, optimizer or torch.optim.Adam(model.parameters(), lr=lr),
                     kd or KDLoss(alpha=0.5 if teacher is not None else 0.0), teacher, pruner, scheduler)
    return loop.run(epochs, start_step, callback, progress, saved=saver.load(),
                    save=saver.save if saver.enabled else None, every=checkpoint_every)


@dataclass
class TrainLoop:
    """The fine-tuning loop of `finetune`, able to save its state and continue from it.

    A checkpoint holds the loader position as (epoch, batches done) plus two RNG snapshots:
    the one at the start of that epoch and the current one. Resuming restores the first,
    draws the same shuffle and skips the done batches (without training on them), then
    restores the second, so every later random draw (dropout, augmentation, shuffles) is the
    one the uninterrupted run made.
    """

    model: nn.Module
    loader: Iterable[tuple[Tensor, Tensor]]
    optimizer: torch.optim.Optimizer
    kd: KDLoss
    teacher: nn.Module | None = None
    pruner: Any = None
    scheduler: Any = None

    def run(self, epochs: int, start_step: int, callback: Callable[[int, int, float], None] | None,
            progress: bool, *, saved: dict[str, Any] | None = None,
            save: Callable[[dict[str, Any]], None] | None = None, every: int = 100) -> int:
        """Train for `epochs` (from `saved`'s position if given); returns the last global step."""
        gens = loader_generators(self.loader)
        pos: dict[str, Any] = {"epoch": 0, "batch": 0, "step": start_step, "loss_total": 0.0}
        if saved is not None:
            self.load_state_dict(saved, epochs, start_step)
            pos = saved["position"]
        if self.teacher is not None:
            self.teacher.eval()
        step = pos["step"]
        for epoch in range(pos["epoch"], epochs):
            self.model.train()
            resumed = saved is not None and epoch == pos["epoch"]
            skip, total = (pos["batch"], pos["loss_total"]) if resumed else (0, 0.0)
            if resumed:  # mid-epoch: replay the epoch's shuffle; at a boundary: the saved state
                set_rng_state(saved["epoch_rng"] if skip else saved["rng"], gens)  # type: ignore[index]
            epoch_rng = rng_state(gens)
            batches = iter(self.loader)
            for i in range(skip):
                if next(batches, None) is None:
                    raise CheckpointError(f"finetune: the loader ran out after {i} batches, the checkpoint is "
                                          f"{skip} batches into epoch {epoch + 1}: resume with the same data")
            if skip:
                set_rng_state(saved["rng"], gens)  # type: ignore[index]
            done = skip
            for x, y in progress_bar(batches, f"epoch {epoch + 1}/{epochs}", progress):
                total += self._train_step(x, y)
                step, done = step + 1, done + 1
                if self.pruner is not None:
                    self.pruner.step(step)
                if save is not None and step % every == 0:
                    save(self.state_dict({"epoch": epoch, "batch": done, "step": step, "loss_total": total},
                                         epoch_rng, epochs, start_step))
            mean = total / max(done, 1)
            log.info("epoch %d: loss %.4f", epoch + 1, mean)
            if callback is not None:
                callback(epoch, step, mean)
            if save is not None:
                save(self.state_dict({"epoch": epoch + 1, "batch": 0, "step": step, "loss_total": 0.0},
                                     None, epochs, start_step))
        return step

    def _train_step(self, x: Tensor, y: Tensor) -> float:
        with torch.no_grad():
            soft = self.teacher(x) if self.teacher is not None else None
        loss = self.kd(self.model(x), soft, y)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        if self.scheduler is not None:
            self.scheduler.step()
        return loss.item()

    def state_dict(self, position: dict[str, Any], epoch_rng: dict[str, Any] | None, epochs: int,
                   start_step: int) -> dict[str, Any]:
        """Everything a resumed loop needs, as nested tensors and plain values."""
        state: dict[str, Any] = {
            "run": {"epochs": epochs, "start_step": start_step},
            "position": position,
            "rng": rng_state(loader_generators(self.loader)),
            "epoch_rng": epoch_rng,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
        }
        for name in ("scheduler", "pruner"):
            owner = getattr(self, name)
            if owner is not None and hasattr(owner, "state_dict"):
                state[name] = owner.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any], epochs: int, start_step: int) -> None:
        """Restore the model, optimizer, scheduler and pruner from `state_dict()` (mutates them)."""
        check_same_run(state["run"], {"epochs": epochs, "start_step": start_step}, "finetune")
        try:
            self.model.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
        except (RuntimeError, ValueError, KeyError) as err:
            raise CheckpointError(f"finetune checkpoint does not fit this model or optimizer: {err}") from None
        for name in ("scheduler", "pruner"):
            owner = getattr(self, name)
            if owner is not None and hasattr(owner, "load_state_dict"):
                if name not in state:
                    raise CheckpointError(f"finetune checkpoint has no {name} state, but a {name} was given")
                owner.load_state_dict(state[name])


@torch.no_grad()
def accuracy(model: nn.Module, loader: Iterable[tuple[Tensor, Tensor]]) -> float:
    """Top-1 accuracy of `model` over `loader` (switches to eval mode)."""
    model.eval()
    correct = seen = 0
    for x, y in loader:
        correct += int((model(x).argmax(dim=-1) == y).sum())
        seen += len(y)
    return correct / max(seen, 1)
