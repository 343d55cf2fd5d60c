"""Wanda and SparseGPT under `torchrun --nproc_per_node 2` (gloo): the same masks and weights on every
rank, equal to one process that saw all the batches."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
from safetensors.torch import load_file  # noqa: E402
from tests.distributed.calibration_ranks import batches, prune_all  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]


def test_two_ranks_calibrate_like_one_process_that_saw_every_batch(tmp_path: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(ROOT / "tests" / "distributed" / "calibration_ranks.py"), str(tmp_path)]
    run = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=180)
    assert run.returncode == 0, run.stderr[-4000:]
    got = load_file(str(tmp_path / "distributed.safetensors"))
    want = prune_all(batches())
    assert got.keys() == want.keys() and len(want) > 0
    for key in want:
        if key.endswith(".mask"):
            assert torch.equal(got[key], want[key]), key
        else:
            torch.testing.assert_close(got[key], want[key], rtol=1e-5, atol=1e-6, msg=key)
    for rank in (0, 1):  # both ranks raise together, naming the rank without data
        message = (tmp_path / f"empty_rank_error.{rank}.txt").read_text()
        assert "rank(s) [1] of 2 have no usable calibration data" in message
