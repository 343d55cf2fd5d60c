"""Recovery fine-tuning of a pruned language model by distillation from its dense teacher.

The pruned student learns to match the unpruned teacher on unlabelled token streams: its
temperature-softened next-token distribution (logit KL, Hinton et al. 2015, "Distilling the
Knowledge in a Neural Network") and/or every decoder block's output, each normalised by the
teacher's (SquareHead, Kurtic et al. 2023, "Sparse Fine-tuning for Inference Acceleration of
Large Language Models": sum_l ||h_s^l - h_t^l||^2 / ||h_t^l||^2). The pruning survives training:
masks are parametrizations (`weight = original * mask`), so optimizer steps move `original`
and the pruned weights still read as zero; a structurally pruned model just has smaller shapes.

The schedule is counted in tokens: the batches are cycled in order until the next optimizer
step would pass the budget. The learning rate is a pure function of the step (warm-up, then
cosine or linear decay), so a resumed run needs no scheduler state.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import math
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import torch
import torch.distributed as dist
from pydantic import Field, field_validator
from torch import Tensor, nn

from prunekit.config import FrozenConfig, recipe_type
from prunekit.core.distributed import all_reduce_sum, in_process_group, is_dtensor, model_group, rank_and_world
from prunekit.core.masks import place_masks
from prunekit.core.progress import progress as progress_bar
from prunekit.core.tracking import Tracker, track
from prunekit.errors import CheckpointError, ConfigError
from prunekit.storage.runstate import Checkpointer, check_same_run, rng_state, set_rng_state
from prunekit.train.losses import kl_sum, squarehead

log = logging.getLogger(__name__)

_IGNORED_KEYS = frozenset({"labels", "use_cache"})  # distillation needs no labels; the loop sets use_cache


@recipe_type
class RecoveryConfig(FrozenConfig):
    """How `recover` fine-tunes a pruned student on its teacher's outputs.

    Args:
        tokens: the token budget (over all ranks); the run takes every optimizer step that fits.
        lr: peak AdamW learning rate (reached at the end of warm-up).
        warmup: warm-up length: an int counts optimizer steps, a float in [0, 1) is a fraction
            of all steps. The rate rises linearly to `lr`, then decays as `decay` says.
        decay: "cosine" or "linear" to zero at the end of the budget, or "constant".
        weight_decay: AdamW's decoupled decay on matrices (norms and biases are not decayed).
        accumulation: micro-batches (per rank) whose gradients make one optimizer step.
        loss: "kl" (logit KL at `temperature`, averaged over tokens), "squarehead" (normalised
            per-block feature MSE; needs `output_hidden_states`, as Hugging Face models have),
            or "kl+squarehead" (their sum, the feature term weighted by `feature_weight`).
        temperature: softening temperature T of the KL term (scaled by T^2).
        precision: "bf16" runs forwards under bf16 autocast (also on CPU); the weights and the
            optimizer stay in their own dtype (fp32 master weights).
        max_grad_norm: clip the global gradient norm to this; None: no clipping.
        checkpoint_every: optimizer steps between checkpoints (with `checkpoint_dir`).
    """

    tokens: int = Field(gt=0)
    lr: float = Field(default=1e-4, gt=0)
    warmup: Annotated[int, Field(ge=0, strict=True)] | float = 0.05
    decay: Literal["cosine", "linear", "constant"] = "cosine"
    weight_decay: float = Field(default=0.0, ge=0)
    accumulation: int = Field(default=1, ge=1)
    loss: Literal["kl", "squarehead", "kl+squarehead"] = "kl"
    temperature: float = Field(default=1.0, gt=0)
    feature_weight: float = Field(default=1.0, ge=0)
    precision: Literal["fp32", "bf16"] = "fp32"
    max_grad_norm: float | None = Field(default=1.0, gt=0)
    checkpoint_every: int = Field(default=100, ge=1)

    @field_validator("warmup")
    @classmethod
    def _warmup_fraction(cls, value: int | float) -> int | float:
        if isinstance(value, float) and not 0.0 <= value < 1.0:
            raise ValueError("a float warmup is a fraction of the steps in [0, 1); give whole steps as an int")
        return value

    def warmup_steps(self, steps: int) -> int:
        """Warm-up length in optimizer steps for a run of `steps` steps."""
        return self.warmup if isinstance(self.warmup, int) else round(self.warmup * steps)

    def lr_at(self, step: int, steps: int) -> float:
        """The learning rate of optimizer step `step` (0-based) of `steps`: a pure function."""
        warm = self.warmup_steps(steps)
        if step < warm:
            return self.lr * (step + 1) / warm
        progress = (step - warm) / max(1, steps - warm)
        if self.decay == "cosine":
            return self.lr * 0.5 * (1.0 + math.cos(math.pi * progress))
        return self.lr * (1.0 - progress) if self.decay == "linear" else self.lr


@dataclass(frozen=True)
class RecoveryStep:
    """One optimizer step of a recovery run: its number (1-based), the tokens trained on so far
    (all ranks), the token-averaged loss over all ranks, and the learning rate it used."""

    step: int
    tokens: int
    loss: float
    lr: float


@dataclass(frozen=True)
class _Batch:
    input_ids: Tensor
    attention_mask: Tensor | None
    tokens: int


def _as_batch(i: int, batch: Any, vocab: int | None) -> _Batch:
    """Validate one user batch (a (B, T) id tensor or a dict with input_ids/attention_mask)."""
    mask = None
    if isinstance(batch, dict):
        unknown = sorted(set(batch) - {"input_ids", "attention_mask"} - _IGNORED_KEYS)
        if "input_ids" not in batch or unknown:
            raise ConfigError(f"batch {i}: a dict batch needs 'input_ids' (and optionally 'attention_mask'), "
                              f"got keys {sorted(batch)}")
        ids, mask = batch["input_ids"], batch.get("attention_mask")
    else:
        ids = batch
    if not isinstance(ids, Tensor) or ids.dtype.is_floating_point or ids.dtype == torch.bool or ids.dim() not in (1, 2):
        raise ConfigError(f"batch {i}: input_ids must be an integer tensor of shape (batch, tokens), got "
                          f"{type(ids).__name__} {getattr(ids, 'dtype', '')} {tuple(getattr(ids, 'shape', ()))}")
    ids = ids.reshape(1, -1) if ids.dim() == 1 else ids
    if ids.numel() == 0:
        raise ConfigError(f"batch {i} holds no tokens (shape {tuple(ids.shape)})")
    if vocab is not None and (int(ids.min()) < 0 or int(ids.max()) >= vocab):
        raise ConfigError(f"batch {i}: token ids span {int(ids.min())}..{int(ids.max())}, outside the "
                          f"vocabulary of {vocab}: tokenise with the model's tokenizer")
    if mask is not None:
        mask = mask.reshape(ids.shape) if mask.numel() == ids.numel() else mask
        if tuple(mask.shape) != tuple(ids.shape):
            raise ConfigError(f"batch {i}: attention_mask shape {tuple(mask.shape)} differs from input_ids "
                              f"{tuple(ids.shape)}")
    tokens = int(mask.bool().sum()) if mask is not None else ids.numel()
    return _Batch(ids, mask, tokens)


def _vocab_size(model: nn.Module) -> int | None:
    """Rows of the output embedding (a Hugging Face model's `lm_head`), else `config.vocab_size`."""
    inner = getattr(model, "module", model)  # DDP wrapper
    getter = getattr(inner, "get_output_embeddings", None)
    head = getter() if callable(getter) else None
    if head is not None and isinstance(getattr(head, "weight", None), Tensor):
        return int(head.weight.shape[0])
    return getattr(getattr(inner, "config", None), "vocab_size", None)


def _is_hf(model: nn.Module) -> bool:
    return hasattr(getattr(model, "module", model), "config")


def _forward(model: nn.Module, batch: _Batch, device: torch.device, hidden: bool) -> tuple[Tensor, Any]:
    """(logits, hidden states or None) of `model` on `batch`."""
    ids = batch.input_ids.to(device)
    if not _is_hf(model):
        out = model(ids)
        return (out if isinstance(out, Tensor) else out[0]), None
    kwargs: dict[str, Any] = {"input_ids": ids, "use_cache": False}
    if batch.attention_mask is not None:
        kwargs["attention_mask"] = batch.attention_mask.to(device)
    if hidden:
        kwargs["output_hidden_states"] = True
    out = model(**kwargs)
    return out.logits, getattr(out, "hidden_states", None)


def _grad_sync(model: nn.Module, sync: bool) -> contextlib.AbstractContextManager[Any]:
    """Skip the gradient all-reduce on accumulation micro-batches but the last (DDP, FSDP2)."""
    if isinstance(model, nn.parallel.DistributedDataParallel) and not sync:
        return model.no_sync()
    fsdp = sys.modules.get("torch.distributed.fsdp")
    if fsdp is not None and isinstance(model, fsdp.FSDPModule):
        model.set_requires_gradient_sync(sync)
    return contextlib.nullcontext()


def _param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    params = [p for p in model.parameters() if p.requires_grad]
    return [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]


def _data_digest(batches: list[_Batch]) -> str:
    h = hashlib.sha256()
    for b in batches:
        for t in (b.input_ids, b.attention_mask):
            if t is not None:
                h.update(repr(tuple(t.shape)).encode())
                h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def _device(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def _plan(every: list[_Batch], world: int, config: RecoveryConfig) -> list[int]:
    """Tokens (over all ranks) of each optimizer step that fits in the budget."""
    slices = [every[r::world] for r in range(world)]
    acc, budget = config.accumulation, config.tokens
    plan: list[int] = []
    spent = 0
    while True:
        s = len(plan)
        tokens = sum(sl[(s * acc + k) % len(sl)].tokens for sl in slices for k in range(acc))
        if spent + tokens > budget:
            break
        plan.append(tokens)
        spent += tokens
    if not plan:
        raise ConfigError(f"RecoveryConfig.tokens={budget} is less than one optimizer step's {tokens} tokens "
                          f"({acc} micro-batch(es) on each of {world} rank(s); batch 0 alone holds "
                          f"{every[0].tokens}): raise tokens or use smaller batches")
    return plan


class Recovery:
    """A recovery run: validated at construction, trained by `run`; `history` holds one
    `RecoveryStep` per optimizer step (restored too when the run resumes).

    Args:
        student: the pruned model (masks attached, or structurally smaller); trained in place.
            Under torchrun, wrap it in `DistributedDataParallel` or shard it with `fully_shard`.
        teacher: the dense model; used in eval mode under `no_grad`, never changed.
        batches: token-id tensors (B, T) or dicts with `input_ids` and optional `attention_mask`
            (`labels`/`use_cache` are ignored). Held in memory (ids are small) and cycled in order.
            Under torchrun pass the same batches on every rank: batch i goes to rank i % world.
        config: the `RecoveryConfig`.
        pruner: a `GradualPruner` on the student, stepped after every optimizer step with the
            1-based step: gradual pruning with distillation in one loop.

    Raises:
        ConfigError: the budget is below one optimizer step's tokens (both named), the teacher's
            and student's vocabularies differ (both sizes), a batch is malformed (its index), a
            rank gets no batches (the rank), "squarehead" on a model without hidden states, or
            an unwrapped student in a process group.
    """

    def __init__(self, student: nn.Module, teacher: nn.Module, batches: Iterable[Any], config: RecoveryConfig,
                 *, pruner: Any = None) -> None:
        self.student, self.teacher, self.config, self.pruner = student, teacher, config, pruner
        self.rank, self.world = rank_and_world()
        vocab_s, vocab_t = _vocab_size(student), _vocab_size(teacher)
        if vocab_s is not None and vocab_t is not None and vocab_s != vocab_t:
            raise ConfigError(f"the student's vocabulary has {vocab_s} tokens, the teacher's {vocab_t}: "
                              "distillation compares their logits token by token; use the same tokenizer")
        if in_process_group() and model_group(student) is None:
            raise ConfigError(f"rank {self.rank} of {self.world}: the student is neither wrapped in "
                              "DistributedDataParallel nor sharded with fully_shard, so each rank would train "
                              "its own copy apart: wrap it before recover")
        place_masks(student)
        self._features = config.loss != "kl"
        if self._features and not (_is_hf(student) and _is_hf(teacher)):
            raise ConfigError(f"RecoveryConfig.loss={config.loss!r} needs the decoder blocks' outputs "
                              "(output_hidden_states=True of Hugging Face models); use loss='kl'")
        every = [_as_batch(i, b, vocab_s or vocab_t) for i, b in enumerate(batches)]
        if len(every) < self.world:
            raise ConfigError(f"rank(s) {list(range(len(every), self.world))} of {self.world} get no batches: "
                              f"{len(every)} batch(es) are dealt as batch i -> rank i % world; pass at least "
                              f"{self.world} (the same list on every rank)")
        self._mine = every[self.rank :: self.world]
        self.step_tokens = _plan(every, self.world, config)
        self._run = {**{f"config.{k}": v for k, v in config.model_dump(mode="json").items()},
                     "world": self.world, "batches": len(every), "data_sha256": _data_digest(every),
                     "steps": len(self.step_tokens)}
        self.optimizer = torch.optim.AdamW([g for g in _param_groups(student, config.weight_decay) if g["params"]],
                                           lr=config.lr)
        self.device, self._teacher_device = _device(student), _device(teacher)
        self.history: list[RecoveryStep] = []

    @property
    def steps(self) -> int:
        """Optimizer steps the budget allows."""
        return len(self.step_tokens)

    def run(self, *, checkpoint_dir: str | Path | None = None, resume: bool = False, progress: bool = True,
            callback: Callable[[int, int, float], None] | None = None, tracker: Tracker | None = None) -> nn.Module:
        """Train the student to the token budget (mutates it and the optimizer); returns the student.

        Args:
            checkpoint_dir: folder of `recovery.ckpt.safetensors` (atomic, no pickle; see
                `prunekit.storage.runstate`), written every `config.checkpoint_every` steps and
                at the end, by rank 0 under torchrun. None: no checkpoints.
            resume: continue from that checkpoint if there is one. Build the student, teacher,
                pruner and batches as for the first run: in one process on CPU with the same seeds
                the result is bit-identical to an uninterrupted run (under torchrun every rank
                restores rank 0's RNG streams).
            progress: a progress bar (steps, with tokens and loss) on rank 0.
            callback: `callback(step, tokens, loss)` after every optimizer step, on every rank,
                with the loss averaged over all ranks' tokens.
            tracker: a `prunekit.core.tracking.Tracker`: "recovery/loss" (as `callback`'s),
                "recovery/lr", "recovery/tokens" and, with a pruner, "recovery/sparsity" (its
                `current_sparsity`) after every optimizer step, at the 1-based step, from rank 0.

        Raises:
            CheckpointError: `checkpoint_dir` holds a checkpoint but `resume` is False, or it is
                of another run (settings, data) or another pruning (shapes, mask layout).
            ConfigError: checkpoints of an FSDP2-sharded student (use torch.distributed.checkpoint).
        """
        if self.history:
            raise ConfigError("this Recovery has already run; build a new one (with resume=True to continue)")
        saver = Checkpointer(checkpoint_dir, "recovery", self.config.checkpoint_every, resume)
        if saver.enabled and any(is_dtensor(p) for p in self.student.parameters()):
            raise ConfigError("checkpoint_dir: a fully_shard (FSDP2) student's state is sharded; checkpoint it "
                              "with torch.distributed.checkpoint in a callback instead")
        saved = saver.load()
        start = self.load_state_dict(saved) if saved is not None else 0
        modes = self.student.training, self.teacher.training
        self.student.train()
        self.teacher.eval()
        tokens = sum(self.step_tokens[:start])
        bar = progress_bar(range(start, self.steps), "recovery", progress, initial=start, total=self.steps)
        try:
            for step in bar:
                loss, lr = self._step(step)
                tokens += self.step_tokens[step]
                if self.pruner is not None:
                    self.pruner.step(step + 1)
                self.history.append(RecoveryStep(step + 1, tokens, loss, lr))
                if saver.enabled and ((step + 1) % saver.every == 0 or step + 1 == self.steps):
                    self._save(saver, step + 1)
                if hasattr(bar, "set_postfix"):
                    bar.set_postfix(tokens=f"{tokens:,}", loss=f"{loss:.4f}", refresh=False)
                track(tracker, {"recovery/loss": loss, "recovery/lr": lr, "recovery/tokens": tokens,
                                "recovery/sparsity": getattr(self.pruner, "current_sparsity", None)}, step + 1)
                if callback is not None:
                    callback(step + 1, tokens, loss)
        finally:
            self.student.train(modes[0])
            self.teacher.train(modes[1])
        if self.rank == 0 and self.history:
            log.info("recovery: %d steps, %d tokens, loss %.4f", self.steps, tokens, self.history[-1].loss)
        return self.student

    def _step(self, step: int) -> tuple[float, float]:
        """One optimizer step over `accumulation` micro-batches per rank; (loss over ranks, lr)."""
        cfg = self.config
        lr = cfg.lr_at(step, self.steps)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        # Each micro-batch's summed loss over the step's tokens on all ranks; DDP and FSDP2 average
        # gradients over ranks, hence the factor world: the gradient is that of the token mean.
        scale = self.world / self.step_tokens[step]
        local = torch.zeros((), dtype=torch.float64)
        for k in range(cfg.accumulation):
            batch = self._mine[(step * cfg.accumulation + k) % len(self._mine)]
            with _grad_sync(self.student, k == cfg.accumulation - 1):
                loss_sum = self._loss_sum(batch)
                (loss_sum * scale).backward()
            local += loss_sum.detach().double().cpu()
        if cfg.max_grad_norm is not None:
            nn.utils.clip_grad_norm_([p for g in self.optimizer.param_groups for p in g["params"]], cfg.max_grad_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(all_reduce_sum(local)) / self.step_tokens[step], lr

    def _loss_sum(self, batch: _Batch) -> Tensor:
        """The distillation loss of one micro-batch, summed (not averaged) over its tokens."""
        cfg = self.config
        autocast: contextlib.AbstractContextManager[Any] = contextlib.nullcontext()
        if cfg.precision == "bf16":
            autocast = torch.autocast(self.device.type, dtype=torch.bfloat16)
        with autocast:
            with torch.no_grad():
                t_logits, t_hidden = _forward(self.teacher, batch, self._teacher_device, self._features)
            s_logits, s_hidden = _forward(self.student, batch, self.device, self._features)
        if s_logits.shape[-1] != t_logits.shape[-1]:
            raise ConfigError(f"the student's logits have {s_logits.shape[-1]} vocabulary entries, the "
                              f"teacher's {t_logits.shape[-1]}: use the same tokenizer and vocabulary")
        mask = batch.attention_mask
        valid = mask.to(self.device).float() if mask is not None else s_logits.new_ones(s_logits.shape[:2])
        total = s_logits.new_zeros((), dtype=torch.float32)
        if cfg.loss != "squarehead":
            total = total + kl_sum(s_logits, t_logits.to(self.device), valid.float(), cfg.temperature)
        if self._features:
            weight = 1.0 if cfg.loss == "squarehead" else cfg.feature_weight
            s_blocks, t_blocks = self._blocks(s_hidden, t_hidden)
            total = total + weight * batch.tokens * squarehead(s_blocks, t_blocks, valid.float())
        return total

    def _blocks(self, student: Any, teacher: Any) -> tuple[list[Tensor], list[Tensor]]:
        """The decoder blocks' outputs: `hidden_states` without the embeddings (entry 0)."""
        if student is None or teacher is None:
            who = "student" if student is None else "teacher"
            raise ConfigError(f"the {who} returned no hidden_states for output_hidden_states=True; "
                              "RecoveryConfig.loss 'squarehead' needs them: use loss='kl'")
        if len(student) != len(teacher):
            raise ConfigError(f"the student has {len(student) - 1} decoder blocks, the teacher {len(teacher) - 1}: "
                              "'squarehead' pairs them block by block; use loss='kl' for a model with blocks removed")
        return list(student[1:]), [t.to(self.device) for t in teacher[1:]]

    # ----------------------------------------------------------------------------------------
    # Checkpoints.

    def state_dict(self, step: int) -> dict[str, Any]:
        """Everything a resumed run needs after `step` optimizer steps (tensors and plain values)."""
        state: dict[str, Any] = {
            "run": self._run,
            "position": {"step": step},
            "rng": rng_state(),
            "model": self.student.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "history": [[r.step, r.tokens, r.loss, r.lr] for r in self.history],
        }
        if self.pruner is not None and hasattr(self.pruner, "state_dict"):
            state["pruner"] = self.pruner.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> int:
        """Restore the student, optimizer, pruner, history and RNG (mutates them); the step reached."""
        check_same_run(state["run"], self._run, "recovery")
        self._check_layout(state["model"])
        try:
            self.student.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
        except (RuntimeError, ValueError, KeyError) as err:
            raise CheckpointError(f"recovery checkpoint does not fit this student or optimizer: {err}") from None
        if self.pruner is not None and hasattr(self.pruner, "load_state_dict"):
            if "pruner" not in state:
                raise CheckpointError("recovery checkpoint has no pruner state, but a pruner was given")
            self.pruner.load_state_dict(state["pruner"])
        set_rng_state(state["rng"])
        self.history = [RecoveryStep(int(s), int(t), float(loss), float(lr)) for s, t, loss, lr in state["history"]]
        return int(state["position"]["step"])

    def _check_layout(self, saved: dict[str, Tensor]) -> None:
        """Refuse a checkpoint of another pruning: other tensors, shapes or (without a pruner) masks."""
        current = self.student.state_dict()
        only_saved, only_here = sorted(set(saved) - set(current)), sorted(set(current) - set(saved))
        if only_saved or only_here:
            raise CheckpointError(f"the recovery checkpoint is of another pruning of the model: tensors only in "
                                  f"the checkpoint {only_saved[:4]}, only in this student {only_here[:4]}; resume "
                                  "with the student the run started from")
        for key, value in saved.items():
            if tuple(value.shape) != tuple(current[key].shape):
                raise CheckpointError(f"the recovery checkpoint is of another pruning shape: {key!r} is "
                                      f"{tuple(value.shape)} there, {tuple(current[key].shape)} in this student")
        if self.pruner is not None:  # a pruner moves the masks during the run: they may differ
            return
        for key, value in saved.items():
            here = current[key].detach().cpu()
            if key.endswith(".mask") and not torch.equal(value, here):
                raise CheckpointError(f"the recovery checkpoint is of another mask layout: mask {key!r} differs "
                                      f"from this student's in {int((value != here).sum())} of {value.numel()} "
                                      "positions; resume with the student the run started from")

    def _save(self, saver: Checkpointer, step: int) -> None:
        if self.rank == 0:
            saver.save(self.state_dict(step))
        if in_process_group():  # no rank reads the file (a resume) before it is written
            dist.barrier()


def recover(student: nn.Module, teacher: nn.Module, batches: Iterable[Any], config: RecoveryConfig, *,
            pruner: Any = None, checkpoint_dir: str | Path | None = None, resume: bool = False,
            progress: bool = True, callback: Callable[[int, int, float], None] | None = None,
            tracker: Tracker | None = None) -> nn.Module:
    """Fine-tune a pruned `student` to match its dense `teacher` on `batches` (mutates, returns it).

    The masks (or pruned shapes) hold throughout; see `Recovery` for the arguments and errors
    and `Recovery.run` for checkpoints. Use `Recovery(...)` directly to read the loss history.

    Example:
        >>> student = pk.prune(copy.deepcopy(teacher), pk.NMConfig(n=2, m=4))
        >>> recover(student, teacher, [ids[i : i + 4] for i in range(0, 64, 4)],
        ...         RecoveryConfig(tokens=50_000, lr=1e-4), progress=False)
    """
    run = Recovery(student, teacher, batches, config, pruner=pruner)
    return run.run(checkpoint_dir=checkpoint_dir, resume=resume, progress=progress, callback=callback,
                   tracker=tracker)

