"""Recovery under `torchrun --nproc_per_node 2` (gloo): a DDP-wrapped masked Llama ends with the same
weights and exact 2:4 masks on every rank, equal to one process accumulating both ranks' batches; so
does a `fully_shard` (FSDP2) student."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
from safetensors.torch import load_file  # noqa: E402
from tests.distributed.launch import run_two_ranks  # noqa: E402
from tests.distributed.recovery_ranks import CONFIG, batches, student_of, tiny_llama  # noqa: E402

from prunekit.train.recovery import Recovery  # noqa: E402


def test_two_ranks_recover_like_one_process_accumulating_both_shares(tmp_path: Path) -> None:
    run_two_ranks("recovery_ranks.py", tmp_path)  # the ranks check equality, masks and resume themselves
    got = load_file(str(tmp_path / "recovered.safetensors"))
    history = json.loads((tmp_path / "history.json").read_text())
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        teacher = tiny_llama()
        student = student_of(teacher)  # step s of rank r takes batch 2 s + r: accumulation 2 in one process
        one = Recovery(student, teacher, batches(), CONFIG.model_copy(update={"accumulation": 2}))
        one.run(progress=False)
    finally:
        torch.set_num_threads(threads)
    want = student.state_dict()
    assert got.keys() == want.keys() and any(k.endswith(".mask") for k in want)
    for key, value in want.items():
        torch.testing.assert_close(got[key], value, rtol=1e-4, atol=1e-5, msg=key)
    steps = [[1, 64], [2, 128], [3, 192], [4, 256]]  # 2 ranks x 32 tokens a step
    assert [h[:2] for h in history] == [[r.step, r.tokens] for r in one.history] == steps
    assert [h[2] for h in history] == pytest.approx([r.loss for r in one.history], rel=1e-4)  # loss over both ranks
    fsdp2 = load_file(str(tmp_path / "recovered_fsdp2.safetensors"))  # sharded: the same weights, masks intact
    assert fsdp2.keys() == want.keys()
    for key, value in want.items():
        if key.endswith(".mask"):
            assert torch.equal(fsdp2[key], value), key
        if key.endswith(".original"):  # FSDP2 masks its stored weights in place: pruned originals are zero
            mask = want[key.removesuffix("original") + "0.mask"]
            assert not fsdp2[key][~mask].any(), key
            value = value * mask
        torch.testing.assert_close(fsdp2[key], value, rtol=1e-4, atol=1e-5, msg=key)
    for rank in (0, 1):  # both ranks raise together, naming the rank without batches
        assert "rank(s) [1] of 2 get no batches" in (tmp_path / f"empty_rank_error.{rank}.txt").read_text()
        assert "neither wrapped in DistributedDataParallel" in (tmp_path / f"unwrapped_error.{rank}.txt").read_text()
