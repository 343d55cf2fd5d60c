"""`finetune` on `torchrun --nproc_per_node 2` (gloo, CPU): DDP and FSDP2 with masks, and resuming a killed job.

Two launches of `finetune_ranks.py`: first the checks (DDP and FSDP2 with exact sparsity, the
same weights on both ranks, an interruption resumed bit-identically, gradient accumulation), an
uninterrupted FSDP2 reference run, and the same run with rank 1 SIGKILLed after a checkpoint;
then that run resumed from its `torch.distributed.checkpoint` checkpoint. A process of world
size 1 must refuse that checkpoint.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file
from tests.distributed.launch import launch_two_ranks
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import prunekit as pk


def _torchrun(attempt: str, out: Path) -> subprocess.CompletedProcess[str]:
    # the first attempt ends in a SIGKILLed rank on purpose and leaves checkpoints: never relaunched
    return launch_two_ranks("finetune_ranks.py", out, attempt, timeout_s=150, relaunch=attempt == "resume")


@pytest.fixture(scope="module")
def job(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The two launches of finetune_ranks.py: the checks ending in rank 1's kill, then the resumed run."""
    out = tmp_path_factory.mktemp("finetune_ranks")
    first, resume = _torchrun("first", out), _torchrun("resume", out)  # launch_two_ranks relaunches a gloo
    return {"out": out, "first": first, "resume": resume}                # teardown abort once


def test_ddp_and_fsdp2_finetune_keep_exact_sparsity_and_agree_across_ranks(job: dict[str, Any]) -> None:
    # the worker's own checks: DDP (uneven loader, replicated teacher, interruption resumed bit-identically,
    # refusals on all ranks), accumulation 2 x b == 1 x 2b, bf16, FSDP2 with a sharded teacher
    assert (job["out"] / "checks_passed").exists(), job["first"].stderr[-6000:]


def test_killed_rank_leaves_the_last_complete_checkpoint(job: dict[str, Any]) -> None:
    first = job["first"]
    assert first.returncode != 0 and "SIGKILL" in first.stderr, first.stderr[-3000:]  # torchrun ended the job
    assert job["resume"].returncode == 0, job["resume"].stderr[-6000:]
    after = json.loads((job["out"] / "after_kill.json").read_text())
    # checkpoints at step 3 (mid epoch 0); the kill came in the epoch-0 callback, before the epoch-end save
    assert after["latest"] == "finetune-000001", after
    assert after["position"] == [0, 3, 3], after  # epoch, batches done, step: the same on both ranks (checked there)


def test_killed_run_resumes_bit_identical_to_an_uninterrupted_one(job: dict[str, Any]) -> None:
    assert job["resume"].returncode == 0, job["resume"].stderr[-6000:]
    want = load_file(str(job["out"] / "fsdp_reference.safetensors"))
    got = load_file(str(job["out"] / "fsdp_resumed.safetensors"))
    assert got.keys() == want.keys() and any(k.endswith(".mask") for k in want)
    for key, value in want.items():
        assert torch.equal(got[key], value), f"{key} differs after the kill and resume"


def test_one_process_refuses_a_checkpoint_of_two_ranks(job: dict[str, Any]) -> None:
    model = nn.Sequential(nn.Linear(16, 4))
    data = DataLoader(TensorDataset(torch.randn(8, 16), torch.zeros(8, dtype=torch.long)), batch_size=4)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    names_both = r"written by 2 ranks \(world size 2\).*one process \(world size 1\)"
    for resume in (True, False):
        with pytest.raises(pk.CheckpointError, match=names_both):
            pk.finetune(model, data, checkpoint_dir=job["out"] / "fsdp_run", resume=resume, progress=False)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
