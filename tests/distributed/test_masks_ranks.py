"""Masks under FSDP2 `fully_shard` and DDP, on `torchrun --nproc_per_node 2` (gloo, CPU).

The worker (`masks_ranks.py`) checks on every rank, against one process on the same full weights:
global magnitude pruning (masks, forward, sparsity), masks stored as shards placed like their
weights (uneven shards: 33 and 21 rows), `finalize`, a `GradualPruner` through optimizer steps
(exact sparsity, equal mask checksums on all ranks), and that ranks at different steps or with
different masks are refused on every rank.
"""

from __future__ import annotations

import json
from pathlib import Path

from tests.distributed.launch import run_two_ranks


def test_masks_on_sharded_and_replicated_models_match_one_process(tmp_path: Path) -> None:
    run_two_ranks("masks_ranks.py", tmp_path, timeout_s=120)
    figures = json.loads((tmp_path / "figures.json").read_text())
    # each rank stores only its shard of every mask: about half of one process's bytes
    assert figures["mask_bytes_rank"] <= figures["mask_bytes_one_process"] // 2 + 64
