"""Distributed calibration, run by `torchrun --nproc_per_node N` (gloo on CPU): each rank prunes a tiny
Llama with its own share of the calibration batches, then checks that every rank holds the same
masks and weights and writes them for the test to compare with one process that saw every batch.

Also importable: `tiny_llama`, `batches` and `prune_all` build the single-process reference.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.distributed as dist
import transformers
from safetensors.torch import save_file

import prunekit as pk
from prunekit.errors import CalibrationError

CONFIGS = {
    "wanda": pk.UnstructuredConfig(sparsity=0.5, criterion="wanda", scope="layer", exclude=["lm_head"]),
    "sparsegpt24": pk.NMConfig(n=2, m=4, criterion="sparsegpt", exclude=["lm_head"]),
}


def tiny_llama() -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return transformers.LlamaForCausalLM(cfg).eval()


def batches(n: int = 4) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [{"input_ids": torch.randint(0, 96, (2, 16), generator=g)} for _ in range(n)]


def prune_all(data: list) -> dict[str, torch.Tensor]:
    """Masks and effective weights of each config, keyed "<config>/<tensor>"."""
    out = {}
    for name, config in CONFIGS.items():
        model = tiny_llama()
        pk.prune(model, config, data=data)
        for key, value in model.state_dict().items():
            if key.endswith((".mask", ".original")):
                out[f"{name}/{key}"] = value.contiguous()
    return out


def main(out_dir: Path) -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    mine = batches()[rank::world]  # each rank calibrates on its own share
    result = prune_all(mine)
    # identical on every rank: compare each tensor's checksum with rank 0's
    for key in sorted(result):
        total = result[key].double().sum().reshape(1)
        gathered = [torch.zeros(1, dtype=torch.float64) for _ in range(world)]
        dist.all_gather(gathered, total)
        if any(g.item() != gathered[0].item() for g in gathered):
            raise SystemExit(f"rank {rank}: {key} differs between ranks: {[g.item() for g in gathered]}")
    if rank == 0:
        save_file(result, str(out_dir / "distributed.safetensors"))
    # a rank with no batches is named, and no rank waits for it in a collective
    try:
        pk.prune(tiny_llama(), CONFIGS["wanda"], data=[] if rank == 1 else mine)
    except CalibrationError as err:
        (out_dir / f"empty_rank_error.{rank}.txt").write_text(str(err))
    dist.barrier()  # rank 0 hosts the store: no rank tears down while another still talks to it
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
