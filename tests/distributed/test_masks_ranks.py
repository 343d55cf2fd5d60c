"""Masks under FSDP2 `fully_shard` and DDP, on `torchrun --nproc_per_node 2` (gloo, CPU).

The worker (`masks_ranks.py`) checks on every rank, against one process on the same full weights:
global magnitude pruning (masks, forward, sparsity), masks stored as shards placed like their
weights (uneven shards: 33 and 21 rows), `finalize`, a `GradualPruner` through optimizer steps
(exact sparsity, equal mask checksums on all ranks), and that ranks at different steps or with
different masks are refused on every rank.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_masks_on_sharded_and_replicated_models_match_one_process(tmp_path: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    # --standalone picks a free port for the rendezvous (a fixed port can collide with a parallel run)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(ROOT / "tests" / "distributed" / "masks_ranks.py"), str(tmp_path)]
    run = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-6000:]
    figures = json.loads((tmp_path / "figures.json").read_text())
    # each rank stores only its shard of every mask: about half of one process's bytes
    assert figures["mask_bytes_rank"] <= figures["mask_bytes_one_process"] // 2 + 64
