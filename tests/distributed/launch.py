"""Run a worker script on two gloo ranks with `torchrun --standalone` (a free rendezvous port)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def launch_two_ranks(worker: str, out: Path, *args: str, timeout_s: int = 180) -> subprocess.CompletedProcess[str]:
    """`torchrun --standalone --nproc_per_node 2 tests/distributed/<worker> <out> <args...>`, whatever its exit code."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(ROOT / "tests" / "distributed" / worker), str(out), *args]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout_s)


def run_two_ranks(worker: str, out: Path, *args: str, timeout_s: int = 180) -> None:
    """`launch_two_ranks`, failing with the ranks' stderr unless both ranks exit 0."""
    run = launch_two_ranks(worker, out, *args, timeout_s=timeout_s)
    assert run.returncode == 0, run.stderr[-6000:]
