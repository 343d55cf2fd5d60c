"""Distributed SparseGPT 2:4 on SmolLM2-135M: N ranks x (calib/N) sequences against 1 rank x calib.

Each rank calibrates on its own share of the Friends windows (rank::world); the per-layer
statistics are summed across ranks, so the pruned model should match one process that saw all
the sequences. Prints, per run: perplexity on the Grimm tales, pruning wall time, and the peak
RSS of every rank. Run it twice and compare the lines:

    python benchmarks/distributed_calibration.py --calib 128                  # 1 process
    torchrun --standalone --nproc_per_node 2 benchmarks/distributed_calibration.py --calib 128

On a GPU machine the same script runs with NCCL (`--backend nccl`; each rank uses cuda:LOCAL_RANK).
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

import prunekit as pk
from prunekit.zoo.llm import corpus_texts, load_smollm2, perplexity

sys.path.insert(0, str(Path(__file__).parent))
from llm_oneshot import calibration_batches  # noqa: E402  (the same windows as the one-shot table)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calib", type=int, default=128, help="calibration sequences over all ranks")
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--eval-tokens", type=int, default=51200)
    parser.add_argument("--backend", default="gloo", choices=["gloo", "nccl"])
    parser.add_argument("--threads", type=int, default=0, help="torch threads per rank (0: cores / ranks)")
    args = parser.parse_args()
    distributed = "WORLD_SIZE" in os.environ
    if distributed:
        dist.init_process_group(args.backend)
        if args.backend == "nccl":
            torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    torch.set_num_threads(args.threads or max(1, (os.cpu_count() or 1) // world))

    model, tokenizer = load_smollm2()
    if args.backend == "nccl":
        model = model.cuda()
    mine = calibration_batches(tokenizer, args.calib, args.seq_len)[rank::world]
    t0 = time.perf_counter()
    pk.prune(model, pk.NMConfig(n=2, m=4, criterion="sparsegpt", exclude=["lm_head"]), data=mine)
    seconds = time.perf_counter() - t0
    peak = torch.tensor([resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20])
    peaks = [peak.clone() for _ in range(world)]
    if distributed:
        dist.all_gather(peaks, peak)
    if rank == 0:
        pk.finalize(model)
        eval_ids = torch.tensor(tokenizer("\n\n".join(corpus_texts("grimm-tales")))["input_ids"])[: args.eval_tokens]
        ppl = perplexity(model.cpu(), eval_ids, args.seq_len)
        print(f"ranks {world} x {len(mine)} sequences: SparseGPT 2:4 perplexity {ppl:.3f}; prune {seconds:.0f} s; "
              f"peak RSS per rank {', '.join(f'{float(p):.2f}' for p in peaks)} GiB", flush=True)
    if distributed:
        dist.barrier()  # rank 0 (the store's host) evaluates last: nobody tears down under it
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
