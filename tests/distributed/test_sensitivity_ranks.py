"""`prunekit.sensitivity` under `torchrun --nproc_per_node 2` (gloo): cells split i % 2, merged into the
single-process table on both ranks; a rank killed mid-cell loses only that cell; a skipped collective
times out with the rank, step and operation named; `accelerate` refuses to run per rank."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tests.distributed.sensitivity_ranks import LEVELS, Evaluate, scan

import prunekit as pk
from prunekit.config import config_to_dict
from prunekit.storage.runstate import load_state, save_state

ROOT = Path(__file__).resolve().parents[2]


def torchrun(out: Path, mode: str, timeout_s: int = 120, **env: str) -> subprocess.CompletedProcess[str]:
    """The worker on two gloo ranks; a hung run fails the test after `timeout_s` instead of hanging it."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(ROOT / "tests" / "distributed" / "sensitivity_ranks.py"), str(out), mode]
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), **env}
    return subprocess.run(cmd, cwd=ROOT, env=full_env, capture_output=True, text=True, timeout=timeout_s)


def reference() -> dict:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each rank runs: the same float reductions
    try:
        return scan(Evaluate()).to_dict()
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Scan A (rank 1 killed mid-cell), what its checkpoints hold, then scan B (resumed; then the timeout)."""
    out = tmp_path_factory.mktemp("ranks")
    killed = torchrun(out, "scan-A")
    saved = [set(load_state(out / "ckpt" / f"sensitivity.rank{r}.ckpt.safetensors",
                            f"sensitivity.rank{r}")["cells"]) - {"baseline"} for r in (0, 1)]
    resumed = torchrun(out, "scan-B", PRUNEKIT_COLLECTIVE_TIMEOUT_S="5")
    return {"out": out, "killed": killed, "saved": saved, "resumed": resumed}


def test_two_ranks_split_the_cells_survive_a_kill_and_merge_into_the_one_process_table(runs: dict) -> None:
    want = reference()
    cells = [f"{unit}@{level!r}" for unit in want["units"] for level in LEVELS]
    shares = [cells[0::2], cells[1::2]]
    out, saved = runs["out"], runs["saved"]
    assert runs["killed"].returncode != 0  # rank 1 died inside its second cell
    assert saved[1] == {shares[1][0]}  # its first cell was checkpointed, the one it died in was not
    assert saved[0] <= set(shares[0])
    assert runs["resumed"].returncode == 0, runs["resumed"].stderr[-6000:]
    for rank in (0, 1):  # each rank measured exactly its share of the cells not yet done, nothing else
        measured = json.loads((out / f"measured.scan-B.rank{rank}.json").read_text())
        assert measured == [c for c in shares[rank] if c not in saved[rank]]
    assert shares[1][1] in json.loads((out / "measured.scan-B.rank1.json").read_text())
    tables = [json.loads((out / f"table.scan-B.rank{r}.json").read_text()) for r in (0, 1)]
    assert tables[0] == tables[1] == want


def test_a_skipped_collective_times_out_naming_rank_step_and_operation(runs: dict) -> None:
    assert runs["resumed"].returncode == 0, runs["resumed"].stderr[-6000:]
    message = (runs["out"] / "timeout_error.txt").read_text()
    assert message.startswith("rank 0 of 2: collective 'all_gather (document sizes)' failed at step "
                              "'sensitivity merge after this rank measured its 5 of 9 cells'"), message
    assert "Timed out" in message and "PRUNEKIT_COLLECTIVE_TIMEOUT_S" in message
    for rank in (0, 1):
        refusal = (runs["out"] / f"accelerate.rank{rank}.txt").read_text()
        assert f"accelerate cannot run inside a process group of 2 ranks (this is rank {rank})" in refusal


def test_one_process_scan_is_unchanged_and_resumes_from_rank_files(tmp_path: Path) -> None:
    """One process reads the per-rank checkpoints of a killed two-rank scan: the cells in them are not redone."""
    want = reference()
    config = pk.UnstructuredConfig(sparsity=0.5)
    run = {"config": config_to_dict(config), "levels": list(LEVELS), "higher_is_better": False}
    done = {"baseline": (want["baseline"], None), f"0@{LEVELS[1]!r}": (want["values"]["0"][1], None)}
    save_state(tmp_path / "sensitivity.rank1.ckpt.safetensors", "sensitivity.rank1",
               {"run": run, "cells": done, "rng": {}})
    evaluate = Evaluate()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        table = scan(evaluate, tmp_path)
    finally:
        torch.set_num_threads(threads)
    assert table.to_dict() == want
    assert "baseline" not in evaluate.measured and f"0@{LEVELS[1]!r}" not in evaluate.measured
    assert len(evaluate.measured) == 3 * len(LEVELS) - 1
