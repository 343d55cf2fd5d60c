"""A sensitivity scan split across `torchrun --nproc_per_node 2` ranks (gloo), run by test_sensitivity_ranks.py.

    python -m torch.distributed.run --standalone --nproc_per_node 2 sensitivity_ranks.py OUT MODE

MODE "scan-A": scan with a checkpoint; rank 1 dies (os._exit) inside the evaluation of its
second cell. MODE "scan-B": resume that scan to the end; each rank writes the cells it measured
(`measured.scan-B.rank<r>.json`) and its table (`table.scan-B.rank<r>.json`). Then, in the same
group (run with a short PRUNEKIT_COLLECTIVE_TIMEOUT_S), both write what `accelerate` says
(`accelerate.rank<r>.txt`), and rank 0 scans again while rank 1 skips the scan and so the merge's
collective: rank 0 writes the error it gets (`timeout_error.txt`).

Also importable: `tiny_mlp`, `Evaluate` and `LEVELS` build the single-process reference.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import torch
from torch import nn

import prunekit as pk
from prunekit.recipes.launch import torchrun_process_group

LEVELS = (0.25, 0.5, 0.75)


def tiny_mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))


class Evaluate:
    """Mean squared output on fixed inputs; records which cell (layer, zero fraction) it measured."""

    def __init__(self, die_on_cell: int = 0) -> None:
        self.x = torch.randn(32, 8, generator=torch.Generator().manual_seed(2))
        self.measured: list[str] = []
        self.die_on_cell = die_on_cell

    def __call__(self, model: nn.Module) -> float:
        pruned = [(name, float((m.weight == 0).float().mean())) for name, m in model.named_modules()
                  if isinstance(m, nn.Linear) and bool((m.weight == 0).any())]
        self.measured.append("baseline" if not pruned else f"{pruned[0][0]}@{pruned[0][1]!r}")
        if self.die_on_cell and len(self.measured) == self.die_on_cell + 1:  # + 1: the baseline came first
            os._exit(3)  # killed mid-cell: the layer is pruned, its value not yet recorded
        with torch.no_grad():
            return float(model(self.x).square().mean())


def scan(evaluate: Evaluate, checkpoint_dir: Path | None = None) -> pk.SensitivityTable:
    return pk.sensitivity(tiny_mlp(), pk.UnstructuredConfig(sparsity=0.5), evaluate, LEVELS,
                          higher_is_better=False, checkpoint_dir=checkpoint_dir, resume=checkpoint_dir is not None)


def main(out: Path, mode: str) -> None:
    if mode == "scan-B":  # start the group together: import skew must not eat the short timeout
        wait_for_files(out, [f"ready.rank{r}" for r in range(2)], mine=f"ready.rank{os.environ['RANK']}")
    with torchrun_process_group():
        rank = torch.distributed.get_rank()
        evaluate = Evaluate(die_on_cell=2 if mode == "scan-A" and rank == 1 else 0)
        table = scan(evaluate, out / "ckpt")
        (out / f"measured.{mode}.rank{rank}.json").write_text(json.dumps(evaluate.measured))
        table.save(out / f"table.{mode}.rank{rank}.json")
        timeout_case(out, rank)


def timeout_case(out: Path, rank: int) -> None:
    try:
        pk.accelerate(tiny_mlp(), torch.randn(1, 8))
    except pk.ConfigError as err:
        (out / f"accelerate.rank{rank}.txt").write_text(str(err))
    error_file = out / "timeout_error.txt"
    if rank == 0:
        try:
            scan(Evaluate())
        except pk.PrunekitError as err:
            error_file.write_text(str(err))
    else:  # skips the scan, so rank 0 waits in the merge's all_gather until the timeout
        wait_for_files(out, [error_file.name])
    os._exit(0)  # the group is broken after a timed-out collective: no barrier, no teardown


def wait_for_files(out: Path, names: list[str], mine: str = "") -> None:
    """Write `mine`, then wait (at most 60 s) until every file in `names` exists in `out`."""
    if mine:
        (out / mine).write_text("")
    deadline = time.monotonic() + 60
    while not all((out / n).exists() for n in names) and time.monotonic() < deadline:
        time.sleep(0.05)


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2])
