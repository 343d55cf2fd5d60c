"""`finetune` under `torchrun --nproc_per_node 2` (gloo, CPU), launched twice: `first`, then `resume` (argv[2]).

first:
- DDP with a GradualPruner and a replicated teacher on an uneven loader: exact sparsity, the
  same weights and mean losses on both ranks, an interruption resumed bit-identically; refusals
  (a checkpoint without resume=True, one rank's unreadable file) raised on all ranks.
- Accumulation: 2 batches of b == 1 batch of 2b (the short last step too); bf16 autocast.
- FSDP2 with a GradualPruner, a sharded teacher, Adam and a scheduler: exact sparsity after the
  optimizer steps; rank 0 writes the final full weights to <out>/fsdp_reference.safetensors and
  then <out>/checks_passed.
- The same FSDP2 run again, checkpointing to <out>/fsdp_run: rank 1 SIGKILLs itself in the
  callback at the end of epoch 0 (after the checkpoint of step 3), and torchrun ends the job.

resume: that run continued with resume=True; rank 0 writes <out>/fsdp_resumed.safetensors and what
it resumed from to <out>/after_kill.json.

A failed check raises, so torchrun exits non-zero with this rank's stderr.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import save_file
from tests.distributed.masks_ranks import shard
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.nn.parallel import DistributedDataParallel
from torch.testing import assert_close
from torch.utils.data import DataLoader, TensorDataset

import prunekit as pk
from prunekit.storage.runstate import load_state

GRADUAL = pk.UnstructuredConfig(sparsity=0.75)
SCHEDULE = pk.Polynomial(start_step=1, end_step=4, every=1)


class Interrupted(KeyboardInterrupt):
    """Raised by a callback on every rank: an interruption at the same point on all of them."""


def mlp(seed: int = 0, dropout: float = 0.1) -> nn.Sequential:
    """33 and 21 rows: uneven shards on 2 ranks; dropout: training draws from each rank's RNG."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(16, 33), nn.ReLU(), nn.Dropout(dropout), nn.Linear(33, 21), nn.ReLU(),
                         nn.Linear(21, 4))


def loader(n: int) -> DataLoader:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, 16, generator=g)
    return DataLoader(TensorDataset(x, x[:, :4].argmax(1)), batch_size=8, shuffle=True,
                      generator=torch.Generator().manual_seed(2))


def rank_rng() -> None:
    torch.manual_seed(100 + dist.get_rank())  # each rank its own dropout stream, as in real runs


def same_on_ranks(values: object, what: str) -> None:
    gathered: list[object] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, values)
    if any(g != gathered[0] for g in gathered):
        raise AssertionError(f"{what} differs between ranks: {gathered}")


def check_exact_sparsity(model: nn.Module, pruner: pk.GradualPruner, what: str) -> None:
    report = pk.sparsity(model)
    want = round(pruner.current_sparsity * report.total_numel)
    assert pruner.current_sparsity > 0 and report.zeros == want, (what, report.zeros, want)
    same_on_ranks((report.zeros, list(report.layers.values())), f"{what}: sparsity")


def full_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every tensor of the model in full (rank 0 only; the masks' zeros applied to the weights)."""
    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return {k: v.contiguous() for k, v in state.items()}


def ddp_run(ckpt: Path, resume: bool = False, interrupt: bool = False) -> tuple[nn.Module, list[float], int]:
    model, teacher = DistributedDataParallel(mlp()), mlp(seed=3)  # the teacher: a plain module on each rank
    pruner = pk.GradualPruner(model, GRADUAL, SCHEDULE)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    losses: list[float] = []

    def record(epoch: int, _step: int, loss: float) -> None:
        losses.append(loss)
        check_exact_sparsity(model, pruner, f"ddp epoch {epoch}")
        if interrupt:
            raise Interrupted

    rank_rng()
    steps = pk.finetune(model, loader(52), epochs=2, optimizer=opt, teacher=teacher, pruner=pruner, callback=record,
                        progress=False, checkpoint_dir=ckpt, checkpoint_every=2, resume=resume)
    return model, losses, steps


def ddp_checks(out: Path) -> None:
    model, losses, steps = ddp_run(out / "ddp_ref")
    # 52 samples: 7 batches, rank 0 gets 4 and rank 1 gets 3; both stop at 3 (3 steps a epoch)
    assert steps == 6, steps
    same_on_ranks(losses, "ddp mean losses")
    flat = torch.cat([v.reshape(-1).float() for v in model.module.state_dict().values()])
    gathered = [torch.empty_like(flat) for _ in range(2)]
    dist.all_gather(gathered, flat)
    assert torch.equal(gathered[0], gathered[1]), "ddp weights differ between ranks"
    try:  # interrupted on both ranks at the end of epoch 0, after the checkpoint of step 2
        ddp_run(out / "ddp_run", interrupt=True)
    except Interrupted:
        pass
    resumed, resumed_losses, resumed_steps = ddp_run(out / "ddp_run", resume=True)
    assert resumed_steps == 6 and resumed_losses == losses, (resumed_losses, losses)
    want = model.module.state_dict()
    for key, value in resumed.module.state_dict().items():
        assert torch.equal(value, want[key]), f"ddp resume: {key} differs from the uninterrupted run"


def refusals(out: Path) -> None:
    """A checkpoint that is there without resume=True, and one rank's unreadable file: all ranks raise."""
    errors = []
    for resume in (False, True):
        try:
            ddp_run(out / "ddp_ref", resume=resume)
        except pk.CheckpointError as err:
            errors.append(str(err))
        else:
            raise AssertionError(f"resume={resume}: the checkpoint was not refused")
        folder = out / "ddp_ref" / "finetune.dcp"
        dist.barrier()
        if dist.get_rank() == 1:
            (folder / (folder / "latest").read_text() / "rank1.ckpt.safetensors").write_bytes(b"not a checkpoint")
        dist.barrier()
    assert "holds the checkpoint of an earlier run" in errors[0], errors
    want = "rank1.ckpt.safetensors" if dist.get_rank() == 1 else "failed on rank(s) [1]"
    assert want in errors[1], errors


def fsdp_run(ckpt: Path, resume: bool = False, kill: bool = False) -> tuple[nn.Module, int]:
    model, teacher = shard(mlp()), shard(mlp(seed=3))  # the teacher sharded too
    pruner = pk.GradualPruner(model, GRADUAL, SCHEDULE)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.5)

    def record(epoch: int, _step: int, _loss: float) -> None:
        check_exact_sparsity(model, pruner, f"fsdp epoch {epoch}")
        if kill and epoch == 0 and dist.get_rank() == 1:
            os.kill(os.getpid(), signal.SIGKILL)

    rank_rng()
    steps = pk.finetune(model, loader(64), epochs=2, optimizer=opt, teacher=teacher, pruner=pruner, scheduler=sched,
                        callback=record, progress=False, checkpoint_dir=ckpt, checkpoint_every=3, resume=resume)
    assert steps == 8 and pruner.current_sparsity == 0.75, (steps, pruner.current_sparsity)
    check_exact_sparsity(model, pruner, "fsdp end")
    return model, steps


def accumulation_checks() -> None:
    """accumulation=2 over halves == accumulation=1 over whole batches, the short last step included."""
    g = torch.Generator().manual_seed(5)
    whole = [(torch.randn(8, 16, generator=g), torch.randint(0, 4, (8,), generator=g)) for _ in range(4)]
    short = [(torch.randn(4, 16, generator=g), torch.randint(0, 4, (4,), generator=g)) for _ in range(2)]
    halves = [(x[i:i + 4], y[i:i + 4]) for x, y in whole for i in (0, 4)]
    # batch j goes to rank j % 2: interleave so that each rank's pairs are the halves of its whole batches
    paired = [halves[k] for pair in ((0, 2, 1, 3), (4, 6, 5, 7)) for k in pair] + short
    results = {}
    for name, data, accumulation, precision in (("one", whole + short, 1, "fp32"), ("two", paired, 2, "fp32"),
                                                ("bf16", whole + short, 1, "bf16")):
        model = DistributedDataParallel(mlp(dropout=0.0))
        steps = pk.finetune(model, data, optimizer=torch.optim.SGD(model.parameters(), lr=0.5), progress=False,
                            accumulation=accumulation, precision=precision)
        assert steps == 3, (name, steps)
        results[name] = model.module.state_dict()
    for key, value in results["one"].items():
        assert not torch.equal(value, mlp(dropout=0.0).state_dict()[key]), f"{key} did not train"
        assert_close(results["two"][key], value, rtol=1e-5, atol=1e-6, msg=f"accumulation: {key}")
        assert results["bf16"][key].dtype == torch.float32
        assert_close(results["bf16"][key], value, rtol=0.05, atol=0.02, msg=f"bf16: {key}")


def first_attempt(out: Path) -> None:
    ddp_checks(out)
    refusals(out)
    accumulation_checks()
    model, _ = fsdp_run(out / "fsdp_ref")
    weights = full_weights(model)
    dist.barrier()
    if dist.get_rank() == 0:
        save_file(weights, str(out / "fsdp_reference.safetensors"))
        (out / "checks_passed").write_text("ok")
    fsdp_run(out / "fsdp_run", kill=True)
    raise AssertionError("rank 1 should have been killed in epoch 0")


def resume_attempt(out: Path) -> None:
    if not (out / "checks_passed").exists():
        raise AssertionError("the first attempt failed its checks (see its traceback above); not resuming")
    folder = out / "fsdp_run" / "finetune.dcp"
    label = (folder / "latest").read_text()
    position = load_state(folder / label / f"rank{dist.get_rank()}.ckpt.safetensors", "finetune")["position"]
    found = {"latest": label, "position": [position[k] for k in ("epoch", "batch", "step")]}  # loss_total: per rank
    same_on_ranks(found, "the checkpoint found after the kill")
    model, _ = fsdp_run(out / "fsdp_run", resume=True)
    weights = full_weights(model)
    if dist.get_rank() == 0:
        save_file(weights, str(out / "fsdp_resumed.safetensors"))
        (out / "after_kill.json").write_text(json.dumps(found))


def main(out: Path, attempt: str) -> None:
    dist.init_process_group("gloo")
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    if attempt == "first":
        first_attempt(out)
    else:
        resume_attempt(out)
    dist.barrier()  # rank 0 hosts the store: no rank tears down while another still talks to it
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2])
