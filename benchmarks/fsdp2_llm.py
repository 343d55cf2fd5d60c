"""FSDP2 memory and speed: SmolLM2-135M gradual pruning with distillation, 1 process vs 2 ranks.

Each run is `prunekit.train.recovery.recover` with a `GradualPruner` (unstructured magnitude to
50 % of the decoder Linears on a cubic schedule, updated every 2 steps) distilling from the
dense teacher (logit KL) on Friends transcript windows. Three runs, one after another:

1. one process, masked (the single-process baseline);
2. `torchrun --nproc_per_node 2`, student and teacher sharded with `fully_shard` per decoder
   block and at the root, masked;
3. the same sharded run without masks (no pruner): the cost of the masks on a sharded step.

Each run writes its ranks' peak RSS, step times and mask-update times; the driver prints the
ratios the issue asks for: peak RSS per rank against the single process, masked against unmasked
sharded step time (the mask updates, every 2nd step here and every few hundred in real runs, are
timed apart and reported on their own), and tokens/s for 1 and 2 processes.

Memory: on CPU, glibc's heap keeps the blocks' freed all-gather buffers and activations (its
dynamic mmap threshold rises to 32 MB), so without a fixed M_MMAP_THRESHOLD a rank's RSS grows to
the single process's. Every leg runs with MALLOC_MMAP_THRESHOLD_=65536 unless
--malloc-mmap-threshold 0. On this 2-core machine two ranks share the two cores
(one thread each, against two threads for the one process), so the tokens/s show overhead,
not scaling.

    python benchmarks/fsdp2_llm.py --steps 12            # the driver: runs the three and compares
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

import prunekit as pk
from prunekit.train.recovery import RecoveryConfig, recover
from prunekit.zoo.llm import load_smollm2

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from llm_oneshot import _peak_rss_gib, calibration_batches  # noqa: E402


def worker(out: Path, steps: int, seq_len: int, masked: bool) -> None:
    """One run (one process, or one rank under torchrun); writes `out/rank<r>.json`."""
    sharded = "WORLD_SIZE" in os.environ and int(os.environ["WORLD_SIZE"]) > 1
    if sharded:
        dist.init_process_group("gloo")
    rank, world = (dist.get_rank(), dist.get_world_size()) if sharded else (0, 1)
    torch.manual_seed(0)
    student, tokenizer = load_smollm2()
    teacher, _ = load_smollm2()
    teacher.requires_grad_(False)
    batches = [b["input_ids"] for b in calibration_batches(tokenizer, steps * world, seq_len, seed=1)]
    pruner = None
    if masked:  # attach before sharding: the masks become DTensors placed like their weights
        pruner = pk.GradualPruner(student, pk.UnstructuredConfig(sparsity=0.5, scope="layer"),
                                  pk.Cubic(start_step=0, end_step=steps, every=2))
    if sharded:
        from torch.distributed.fsdp import fully_shard

        for model in (student, teacher):
            for block in model.model.layers:
                fully_shard(block)
            fully_shard(model)
    stamps: list[float] = []
    updates: dict[int, float] = {}  # step -> seconds spent in a mask update (pruner.step that changed masks)
    if pruner is not None:
        pruner_step = pruner.step

        def timed_step(step: int) -> bool:
            began = time.perf_counter()
            changed = pruner_step(step)
            if changed:
                updates[len(stamps)] = time.perf_counter() - began
            return changed

        pruner.step = timed_step  # type: ignore[method-assign]
    config = RecoveryConfig(tokens=steps * world * seq_len, lr=1e-5, warmup=0, decay="constant")
    start = time.perf_counter()
    recover(student, teacher, batches, config, pruner=pruner, progress=False,
            callback=lambda step, tokens, loss: stamps.append(time.perf_counter()))
    wall = time.perf_counter() - start
    # interval i runs from callback i to callback i+1; the mask update, if any, happened inside it
    step_s = [b - a - updates.get(i + 1, 0.0) for i, (a, b) in enumerate(zip(stamps, stamps[1:], strict=False))]
    result = {"rank": rank, "world": world, "masked": masked, "steps": len(stamps), "wall_s": wall,
              "step_s_median": statistics.median(step_s[1:] or step_s), "tokens": steps * world * seq_len,
              "updates": len(updates), "update_s_median": statistics.median(updates.values()) if updates else 0.0,
              "peak_rss_GiB": _peak_rss_gib(), "sparsity": float(pk.sparsity(student).total) if masked else 0.0}
    (out / f"rank{rank}.json").write_text(json.dumps(result))
    if sharded:
        dist.barrier()
        dist.destroy_process_group()


def _launch(out: Path, args: argparse.Namespace, world: int, masked: bool) -> list[dict]:
    out.mkdir(parents=True, exist_ok=True)
    flags = ["--worker", str(out), "--steps", str(args.steps), "--seq-len", str(args.seq_len)]
    flags += [] if masked else ["--no-masks"]
    env = {**os.environ, "OMP_NUM_THREADS": str(2 // world)}
    if args.malloc_mmap_threshold:  # the same allocator setting for every leg
        env["MALLOC_MMAP_THRESHOLD_"] = str(args.malloc_mmap_threshold)
    cmd = [sys.executable, __file__, *flags] if world == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(world), __file__, *flags]
    subprocess.run(cmd, check=True, env=env)
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(world)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--no-masks", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--steps", type=int, default=12, help="optimizer steps per run")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--out", type=Path, default=Path("fsdp2_llm"))
    parser.add_argument("--malloc-mmap-threshold", type=int, default=65536,
                        help="glibc M_MMAP_THRESHOLD for every leg (0: glibc's default, which keeps freed "
                             "all-gather buffers on the heap)")
    args = parser.parse_args()
    if args.worker is not None:
        worker(args.worker, args.steps, args.seq_len, masked=not args.no_masks)
        return
    one = _launch(args.out / "one_masked", args, 1, True)[0]
    two = _launch(args.out / "two_masked", args, 2, True)
    dense = _launch(args.out / "two_unmasked", args, 2, False)
    runs = (("1 process, masked", [one]), ("2 ranks FSDP2, masked", two), ("2 ranks FSDP2, no masks", dense))
    for name, ranks in runs:
        for r in ranks:
            print(f"{name:>24} rank {r['rank']}: peak RSS {r['peak_rss_GiB']:.2f} GiB, median step "
                  f"{r['step_s_median']:.2f} s (without mask updates), {r['updates']} mask updates "
                  f"(median {r['update_s_median']:.2f} s), {r['tokens'] / r['wall_s']:.0f} tokens/s, "
                  f"sparsity {r['sparsity']:.3f}")
    rss = max(r["peak_rss_GiB"] for r in two) / one["peak_rss_GiB"]
    step = statistics.median(r["step_s_median"] for r in two) / statistics.median(r["step_s_median"] for r in dense)
    print(f"\npeak RSS per rank / single process: {rss:.2f} (target <= 0.65)")
    print(f"masked / unmasked sharded step: {step:.2f} (target <= 1.2)")
    print(f"tokens/s: 1 process {one['tokens'] / one['wall_s']:.0f}, 2 ranks "
          f"{two[0]['tokens'] / max(r['wall_s'] for r in two):.0f} (2 cores shared: overhead, not scaling)")
    (args.out / "summary.json").write_text(json.dumps({"one": one, "two": two, "two_unmasked": dense,
                                                        "rss_ratio": rss, "masked_step_ratio": step}, indent=1))


if __name__ == "__main__":
    main()
