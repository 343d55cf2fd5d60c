"""Wanda and SparseGPT under `torchrun --nproc_per_node 2` (gloo): the same masks and weights on every
rank, equal to one process that saw all the batches."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
from safetensors.torch import load_file  # noqa: E402
from tests.distributed.calibration_ranks import batches, prune_all  # noqa: E402
from tests.distributed.launch import run_two_ranks  # noqa: E402


def test_two_ranks_calibrate_like_one_process_that_saw_every_batch(tmp_path: Path) -> None:
    run_two_ranks("calibration_ranks.py", tmp_path)
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
