"""Knowledge distillation (`KDLoss`) and a small fine-tuning loop that drives a pruner.

Hinton et al. 2015, "Distilling the Knowledge in a Neural Network": the student matches the
teacher's temperature-softened distribution as well as the hard labels; the soft targets
carry the dark knowledge a pruned network needs to recover.

`finetune` runs in one process or under torchrun on a DDP or FSDP2 (`fully_shard`) model, with
gradient accumulation and bf16 autocast; its checkpoints resume bit-identically (one process:
`prunekit.storage.runstate`; torchrun: `prunekit.storage.distributed_state`, through DCP).
"""

from __future__ import annotations

import contextlib
import itertools
import logging
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DistributedSampler

from prunekit.core.distributed import all_reduce_sum, in_process_group, is_main_rank, model_group, rank_and_world
from prunekit.core.masks import place_masks
from prunekit.core.progress import progress as progress_bar
from prunekit.core.tracking import Tracker, track
from prunekit.errors import CheckpointError, ConfigError
from prunekit.storage.distributed_state import (
    DistributedCheckpointer,
    distributed_checkpoint_world,
    set_sharded_state,
    sharded_state,
    world_size_error,
)
from prunekit.storage.runstate import Checkpointer, check_same_run, loader_generators, rng_state, set_rng_state
from prunekit.train.schedule import GradualPruner

log = logging.getLogger(__name__)

Precision = Literal["fp32", "bf16"]


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
    accumulation: int = 1,
    precision: Precision = "fp32",
    tracker: Tracker | None = None,
) -> int:
    """Train `model` on `(x, y)` batches, distilling from `teacher` if given (mutates model).

    After every optimizer step it calls `pruner.step(step)` (a `GradualPruner`) and, at the
    end of each epoch, `callback(epoch, step, mean_loss)`.

    Under torchrun (a process group of more than one rank) every rank calls it, with `model`
    wrapped in `DistributedDataParallel` or sharded with `fully_shard`, and the same arguments:

    - Data: a DataLoader whose sampler is a `DistributedSampler` already gives each rank its
      share (`set_epoch(epoch)` is called at each epoch's start). Any other loader must yield the
      same batches in the same order on every rank (seed its shuffle alike); rank r trains on
      batches r, r + world, r + 2 * world, ... Every rank makes the same number of optimizer
      steps (one small all_reduce per batch checks that each rank has a batch): when the ranks'
      shares differ in length, all stop at the shortest, dropping the longer shares' tails (at
      most world - 1 batches per epoch when sharding here).
    - `teacher`: a plain module is run by each rank on its own batches; a `fully_shard` teacher
      works too (its forward is a collective, and every rank calls it once per batch).
    - `callback` gets the loss averaged over all ranks' batches, on every rank; logs and the
      progress bar are on rank 0 only.
    - Checkpoints go through `torch.distributed.checkpoint` (see
      `prunekit.storage.distributed_state`): `checkpoint_dir` must be one folder all ranks see,
      and a run resumes only with the world size that wrote it.

    Args:
        checkpoint_dir: folder for `finetune.ckpt.safetensors` (one process) or `finetune.dcp/`
            (torchrun), written atomically every `checkpoint_every` optimizer steps and at each
            epoch's end: the model (masks included), optimizer, scheduler and pruner states, the
            position in the loader and the RNG states (each rank's). None: no checkpoints.
        checkpoint_every: optimizer steps between checkpoints.
        resume: continue from the checkpoint in `checkpoint_dir` if there is one. Build the
            model, pruner, optimizer and loader as for the first run; with the same seeds on
            CPU the result is bit-identical to an uninterrupted run. `callback` is not called
            again for epochs that ended before the interruption.
        accumulation: batches per optimizer step; their gradients are averaged (the loss of each
            is divided by `accumulation`). A DDP model skips the gradient all-reduce for all but
            the last batch of each step (`no_sync`); FSDP2 reduce-scatters every batch. An epoch
            whose batches do not divide evenly ends with a step over the remaining ones,
            averaged over those.
        precision: "fp32", or "bf16": forward passes (student and teacher) under
            `torch.autocast(dtype=torch.bfloat16)` on the model's device; the weights, gradients
            and optimizer state stay float32, and the loss is computed in float32.
        tracker: a `prunekit.core.tracking.Tracker`: after every optimizer step "finetune/loss"
            (the mean over that step's batches; under torchrun rank 0's), "finetune/lr" (the first
            param group's) and "finetune/sparsity" (the pruner's `current_sparsity`), and at each
            epoch's end "finetune/epoch_loss" (as given to `callback`), at the global step.

    Returns:
        The global step after the last batch, to continue a schedule in another call.

    Raises:
        ConfigError: a bad `accumulation` or `precision`, bf16 on a GPU without it, or a plain
            (neither DDP nor FSDP2) model under torchrun, whose ranks would train apart.
        CheckpointError: `checkpoint_dir` holds a checkpoint but `resume` is False, or the
            checkpoint does not fit this model, optimizer, loader or world size.

    Example:
        >>> # torchrun --nproc_per_node 2 train.py; each rank:
        >>> model = DistributedDataParallel(model)  # doctest: +SKIP
        >>> finetune(model, loader, epochs=3, teacher=dense, pruner=pruner, accumulation=4,
        ...          precision="bf16", checkpoint_dir="ckpt", resume=True)  # doctest: +SKIP
    """
    loop = TrainLoop(model, loader, optimizer or torch.optim.Adam(model.parameters(), lr=lr),
                     kd or KDLoss(alpha=0.5 if teacher is not None else 0.0), teacher, pruner, scheduler,
                     accumulation=accumulation, precision=precision, tracker=tracker)
    saver: Checkpointer | DistributedCheckpointer
    if in_process_group():
        saver = DistributedCheckpointer(checkpoint_dir, "finetune", checkpoint_every, resume)
        saved = _resume_distributed(saver, loop, epochs, start_step)
    else:
        saver = Checkpointer(checkpoint_dir, "finetune", checkpoint_every, resume)
        written_by = distributed_checkpoint_world(checkpoint_dir, "finetune")
        if written_by is not None:
            raise world_size_error(written_by, 1, checkpoint_dir or ".")
        saved = saver.load()
    return loop.run(epochs, start_step, callback, progress, saved=saved,
                    save=saver.save if saver.enabled else None, every=checkpoint_every)


def _resume_distributed(saver: DistributedCheckpointer, loop: TrainLoop, epochs: int,
                        start_step: int) -> dict[str, Any] | None:
    state = saver.load()
    if state is None:
        return None
    check_same_run(state["run"], loop.run_settings(epochs, start_step), "finetune")  # before any tensor moves
    return saver.load_tensors(state, sharded_state(loop.model, loop.optimizer))


@dataclass
class TrainLoop:
    """The fine-tuning loop of `finetune`, able to save its state and continue from it.

    A checkpoint holds the loader position as (epoch, batches done) plus two RNG snapshots:
    the one at the start of that epoch and the current one. Resuming restores the first,
    draws the same shuffle and skips the done batches (without training on them), then
    restores the second, so every later random draw (dropout, augmentation, shuffles) is the
    one the uninterrupted run made. Under torchrun each rank keeps its own position and RNG.
    """

    model: nn.Module
    loader: Iterable[tuple[Tensor, Tensor]]
    optimizer: torch.optim.Optimizer
    kd: KDLoss
    teacher: nn.Module | None = None
    pruner: Any = None
    scheduler: Any = None
    accumulation: int = 1
    precision: Precision = "fp32"
    tracker: Tracker | None = None

    def __post_init__(self) -> None:
        if isinstance(self.accumulation, bool) or not isinstance(self.accumulation, int) or self.accumulation < 1:
            raise ConfigError(f"finetune.accumulation must be an int >= 1 (batches per optimizer step), "
                              f"got {self.accumulation!r}")
        if self.precision not in ("fp32", "bf16"):
            raise ConfigError(f"finetune.precision must be 'fp32' or 'bf16', got {self.precision!r}")
        device = _device(self.model)
        if self.precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
            raise ConfigError(f"finetune.precision='bf16': {torch.cuda.get_device_name(device)} has no bfloat16; "
                              "use precision='fp32'")
        if in_process_group() and model_group(self.model) is None:
            raise ConfigError(f"finetune under torchrun (world size {rank_and_world()[1]}) needs the model wrapped "
                              "in DistributedDataParallel or sharded with fully_shard; a plain "
                              f"{type(self.model).__name__} would train apart on each rank's batches")
        place_masks(self.model)

    def run_settings(self, epochs: int, start_step: int) -> dict[str, Any]:
        """The settings a checkpoint must share with the run that resumes it."""
        run: dict[str, Any] = {"epochs": epochs, "start_step": start_step}
        if self.accumulation != 1:  # absent at 1: checkpoints from before the option still resume
            run["accumulation"] = self.accumulation
        return run

    def run(self, epochs: int, start_step: int, callback: Callable[[int, int, float], None] | None,
            progress: bool, *, saved: dict[str, Any] | None = None,
            save: Callable[[dict[str, Any]], None] | None = None, every: int = 100) -> int:
        """Train for `epochs` (from `saved`'s position if given); returns the last global step."""
        pos: dict[str, Any] = {"epoch": 0, "batch": 0, "step": start_step, "loss_total": 0.0}
        if saved is not None:
            self.load_state_dict(saved, epochs, start_step)
            pos = saved["position"]
        if self.teacher is not None:
            self.teacher.eval()
        self.optimizer.zero_grad(set_to_none=True)
        step = pos["step"]
        for epoch in range(pos["epoch"], epochs):
            resumed = saved if saved is not None and epoch == pos["epoch"] else None
            step, total, done = self._epoch(epoch, epochs, step, resumed, progress, save, every, start_step)
            mean = _mean_over_ranks(total, done)
            if is_main_rank():
                log.info("epoch %d: loss %.4f", epoch + 1, mean)
            track(self.tracker, {"finetune/epoch_loss": mean}, step)
            if callback is not None:
                callback(epoch, step, mean)
            if save is not None:
                save(self.state_dict({"epoch": epoch + 1, "batch": 0, "step": step, "loss_total": 0.0},
                                     None, epochs, start_step))
        return step

    def _epoch(self, epoch: int, epochs: int, step: int, saved: dict[str, Any] | None, progress: bool,
               save: Callable[[dict[str, Any]], None] | None, every: int, start_step: int) -> tuple[int, float, int]:
        """One epoch (the rest of it when `saved`): returns (global step, loss sum, batches done)."""
        gens = loader_generators(self.loader)
        self.model.train()
        skip, total = (saved["position"]["batch"], saved["position"]["loss_total"]) if saved else (0, 0.0)
        if saved is not None:  # mid-epoch: replay the epoch's shuffle; at a boundary: the saved state
            set_rng_state(saved["epoch_rng"] if skip else saved["rng"], gens)
        epoch_rng = rng_state(gens)
        batches = self._batches(epoch)
        for i in range(skip):
            if next(batches, None) is None:
                raise CheckpointError(f"finetune: the loader ran out after {i} batches, the checkpoint is "
                                      f"{skip} batches into epoch {epoch + 1}: resume with the same data")
        if skip:
            set_rng_state(saved["rng"], gens)  # type: ignore[index]
        done, pending, step_loss = skip, 0, 0.0
        for x, y in progress_bar(batches, f"epoch {epoch + 1}/{epochs}", progress):
            pending += 1
            loss = self._micro_step(x, y, sync=pending == self.accumulation)
            total, step_loss, done = total + loss, step_loss + loss, done + 1
            if pending == self.accumulation:
                step, pending = self._optimizer_step(step, pending, step_loss), 0
                step_loss = 0.0
                if save is not None and step % every == 0:
                    save(self.state_dict({"epoch": epoch, "batch": done, "step": step, "loss_total": total},
                                         epoch_rng, epochs, start_step))
        if pending:
            step = self._optimizer_step(step, pending, step_loss)
        return step, total, done

    def _batches(self, epoch: int) -> Iterator[Any]:
        """This rank's batches of `epoch`; under torchrun, stopping on all ranks when one runs out."""
        sampler = _distributed_sampler(self.loader)
        if sampler is not None:
            sampler.set_epoch(epoch)
        batches = iter(self.loader)
        if not in_process_group():
            return batches
        rank, world = rank_and_world()
        if sampler is None:
            batches = itertools.islice(batches, rank, None, world)
        return _together(batches, world)

    def _micro_step(self, x: Tensor, y: Tensor, sync: bool) -> float:
        """Forward and backward of one batch, gradients added to `.grad`; returns its loss."""
        skip_sync = not sync and isinstance(self.model, nn.parallel.DistributedDataParallel)
        with self.model.no_sync() if skip_sync else contextlib.nullcontext():  # type: ignore[operator]
            with self._autocast():
                with torch.no_grad():
                    soft = self.teacher(x) if self.teacher is not None else None
                out = self.model(x)
            loss = self.kd(out.float(), None if soft is None else soft.float(), y)
            (loss / self.accumulation if self.accumulation > 1 else loss).backward()
        return loss.item()

    def _autocast(self) -> contextlib.AbstractContextManager[Any]:
        if self.precision == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(_device(self.model).type, dtype=torch.bfloat16)

    def _optimizer_step(self, step: int, pending: int, loss_sum: float = 0.0) -> int:
        """Step the optimizer, scheduler and pruner over `pending` accumulated batches (whose losses
        add up to `loss_sum`, for the tracker); the new step."""
        if pending < self.accumulation:
            self._finish_short_step(pending)
        lr = self.optimizer.param_groups[0]["lr"]  # the rate this step uses, before the scheduler moves it
        self.optimizer.step()
        if self.scheduler is not None:
            self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        step += 1
        if self.pruner is not None:
            self.pruner.step(step)
        track(self.tracker, {"finetune/loss": loss_sum / pending, "finetune/lr": lr,
                             "finetune/sparsity": getattr(self.pruner, "current_sparsity", None)}, step)
        return step

    @torch.no_grad()
    def _finish_short_step(self, pending: int) -> None:
        """An epoch's last step over fewer batches than `accumulation`: average over those.

        Under DDP they all ran in `no_sync`, so their gradients are all-reduced here (averaged, as
        DDP does); FSDP2 already reduce-scattered each one.
        """
        scale = self.accumulation / pending
        group = model_group(self.model)
        replicated = group is not None and not group[0]
        world = rank_and_world()[1]
        for p in self.model.parameters():
            if not p.requires_grad:
                continue
            if replicated:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
                dist.all_reduce(p.grad, group=group[1])  # type: ignore[index]
                p.grad.mul_(scale / world)
            elif p.grad is not None:
                p.grad.mul_(scale)

    def state_dict(self, position: dict[str, Any], epoch_rng: dict[str, Any] | None, epochs: int,
                   start_step: int) -> dict[str, Any]:
        """Everything a resumed loop needs, as nested tensors and plain values.

        Under torchrun the model and optimizer are in `get_state_dict`'s form (DTensor shards
        under FSDP2), and a `GradualPruner`'s masks are left to the model's state, which holds them.
        """
        distributed = in_process_group()
        state: dict[str, Any] = {
            "run": self.run_settings(epochs, start_step),
            "position": position,
            "rng": rng_state(loader_generators(self.loader)),
            "epoch_rng": epoch_rng,
        }
        if distributed:
            state.update(sharded_state(self.model, self.optimizer))
        else:
            state.update(model=self.model.state_dict(), optimizer=self.optimizer.state_dict())
        for name in ("scheduler", "pruner"):
            owner = getattr(self, name)
            if owner is not None and hasattr(owner, "state_dict"):
                owned = owner.state_dict()
                if distributed and isinstance(owner, GradualPruner):
                    owned = {k: v for k, v in owned.items() if k != "masks"}
                state[name] = owned
        return state

    def load_state_dict(self, state: dict[str, Any], epochs: int, start_step: int) -> None:
        """Restore the model, optimizer, scheduler and pruner from `state_dict()` (mutates them)."""
        check_same_run(state["run"], self.run_settings(epochs, start_step), "finetune")
        distributed = in_process_group()
        if distributed:
            set_sharded_state(self.model, self.optimizer, state)
        else:
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
                owned = state[name]
                if distributed and isinstance(owner, GradualPruner):  # its masks: the model's, just loaded
                    owned = {**owner.state_dict(), **owned}
                owner.load_state_dict(owned)


_END = object()


def _together(batches: Iterator[Any], world: int) -> Iterator[Any]:
    """`batches` while every rank still has one (a collective per batch: call on every rank)."""
    while True:
        batch = next(batches, _END)
        ready = all_reduce_sum(torch.tensor([0.0 if batch is _END else 1.0]))
        if int(ready.item()) < world:
            return
        yield batch


def _mean_over_ranks(total: float, done: int) -> float:
    if in_process_group():
        total, done_f = all_reduce_sum(torch.tensor([total, float(done)], dtype=torch.float64)).tolist()
        return float(total / max(done_f, 1.0))
    return total / max(done, 1)


def _distributed_sampler(loader: Any) -> DistributedSampler[Any] | None:
    batch_sampler = getattr(loader, "batch_sampler", None)
    for owner in (getattr(loader, "sampler", None), getattr(batch_sampler, "sampler", None)):
        if isinstance(owner, DistributedSampler):
            return owner
    return None


def _device(model: nn.Module) -> torch.device:
    param = next(iter(model.parameters()), None)
    return param.device if param is not None else torch.device("cpu")


@torch.no_grad()
def accuracy(model: nn.Module, loader: Iterable[tuple[Tensor, Tensor]]) -> float:
    """Top-1 accuracy of `model` over `loader` (switches to eval mode)."""
    model.eval()
    correct = seen = 0
    for x, y in loader:
        correct += int((model(x).argmax(dim=-1) == y).sum())
        seen += len(y)
    return correct / max(seen, 1)
