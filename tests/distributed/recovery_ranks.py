"""Recovery under `torchrun --nproc_per_node 2` (gloo on CPU): a DDP-wrapped, 2:4-masked tiny Llama
distils from its dense teacher, each rank on its own share of the batches (batch i -> rank i % 2).

Each rank checks that the ranks hold identical weights and the exact 2:4 masks, and that a run
interrupted at a checkpoint and resumed ends bit-identical to the uninterrupted one; rank 0 writes
the weights and the loss history for the test to compare with one process that accumulated the
same batches, and the weights of the same run on a `fully_shard` (FSDP2) student. Also importable:
`tiny_llama`, `batches`, `student_of` and `CONFIG` build that reference.
"""

from __future__ import annotations

import copy
import json
import sys
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist
import transformers
from safetensors.torch import save_file
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel

import prunekit as pk
from prunekit.core.masks import get_mask, masked_modules
from prunekit.errors import ConfigError
from prunekit.train.recovery import Recovery, RecoveryConfig

CONFIG = RecoveryConfig(tokens=64 * 4, lr=1e-2, warmup=1, weight_decay=0.01, checkpoint_every=2)  # 4 steps of 2 x 32


def tiny_llama() -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                   initializer_range=0.2)
    return transformers.LlamaForCausalLM(cfg).eval()


def batches(n: int = 6) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.randint(0, 96, (2, 16), generator=g) for _ in range(n)]


def student_of(teacher: torch.nn.Module) -> torch.nn.Module:
    return pk.prune(copy.deepcopy(teacher), pk.NMConfig(n=2, m=4, exclude=["lm_head"]))


def masks(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {fqn: get_mask(m).mask.clone() for fqn, m in masked_modules(model).items()}  # type: ignore[union-attr]


def same_on_ranks(tensors: dict[str, torch.Tensor], what: str) -> None:
    world = dist.get_world_size()
    for key, value in tensors.items():
        gathered = [torch.empty_like(value) for _ in range(world)]
        dist.all_gather(gathered, value.contiguous())
        if not all(torch.equal(g, gathered[0]) for g in gathered):
            raise SystemExit(f"rank {dist.get_rank()}: {what}: {key} differs between ranks")


class Interrupted(Exception):
    pass


def stop_at(step: int) -> Callable[[int, int, float], None]:
    def callback(s: int, tokens: int, loss: float) -> None:
        if s == step:
            raise Interrupted

    return callback


def fsdp2(teacher: torch.nn.Module, out_dir: Path) -> None:
    """The same run with the student sharded by `fully_shard` (per decoder layer, then the root)."""
    student = student_of(teacher)
    for layer in student.model.layers:
        fully_shard(layer)
    fully_shard(student)
    Recovery(student, teacher, batches(), CONFIG).run(progress=False)
    full = {k: v.full_tensor() if isinstance(v, DTensor) else v for k, v in student.state_dict().items()}
    if dist.get_rank() == 0:
        save_file({k: v.contiguous() for k, v in full.items()}, str(out_dir / "recovered_fsdp2.safetensors"))


def errors(teacher: torch.nn.Module, out_dir: Path) -> None:
    """A rank without batches is named on every rank; an unwrapped student is refused."""
    rank = dist.get_rank()
    for name, student, data in [("empty_rank", DistributedDataParallel(student_of(teacher)), batches(1)),
                                ("unwrapped", student_of(teacher), batches())]:
        try:
            Recovery(student, teacher, data, CONFIG)
        except ConfigError as err:
            (out_dir / f"{name}_error.{rank}.txt").write_text(str(err))


def main(out_dir: Path) -> None:
    dist.init_process_group("gloo")
    torch.set_num_threads(1)
    rank = dist.get_rank()
    teacher = tiny_llama()
    student = DistributedDataParallel(student_of(teacher))
    before = masks(student.module)
    run = Recovery(student, teacher, batches(), CONFIG)
    run.run(progress=False)
    weights = {k: v.detach().clone() for k, v in student.module.state_dict().items()}
    same_on_ranks(weights, "after recovery")
    if masks(student.module).keys() != before.keys() or not all(
            torch.equal(m, before[k]) for k, m in masks(student.module).items()):
        raise SystemExit(f"rank {rank}: the masks changed during recovery")
    if not pk.check_nm(student.module, 2, 4).ok:
        raise SystemExit(f"rank {rank}: the 2:4 pattern broke during recovery")
    # interrupted after the checkpoint at step 2, then resumed: bit-identical to the whole run
    ckpt = out_dir / "ckpt"
    try:
        Recovery(DistributedDataParallel(student_of(teacher)), teacher, batches(), CONFIG).run(
            checkpoint_dir=ckpt, progress=False, callback=stop_at(2))
    except Interrupted:
        pass
    resumed = Recovery(DistributedDataParallel(student_of(teacher)), teacher, batches(), CONFIG)
    resumed.run(checkpoint_dir=ckpt, resume=True, progress=False)
    for key, value in resumed.student.module.state_dict().items():
        if not torch.equal(value, weights[key]):
            raise SystemExit(f"rank {rank}: resumed run differs from the whole run at {key}")
    if resumed.history != run.history:
        raise SystemExit(f"rank {rank}: resumed history {resumed.history} != {run.history}")
    if rank == 0:
        save_file({k: v.contiguous() for k, v in weights.items()}, str(out_dir / "recovered.safetensors"))
        (out_dir / "history.json").write_text(json.dumps([[r.step, r.tokens, r.loss, r.lr] for r in run.history]))
    fsdp2(teacher, out_dir)
    errors(teacher, out_dir)
    dist.barrier()  # rank 0 hosts the store: no rank tears down while another still talks to it
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
