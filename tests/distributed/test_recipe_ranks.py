"""The CLI under torchrun: one recipe, unchanged, in one process and on two gloo ranks gives the same files.

`torchrun --nproc_per_node 2 -m prunekit prune` calibrates Wanda on each rank's share of the batches
(batch i on rank i % 2) and saves what one process that saw every batch saves, and so does the
`prunekit` console script under torchrun. Only rank 0 prints. Commands that are per-process refuse
to run under torchrun. (The scan split is tested in test_sensitivity_ranks.py.)
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tests.distributed.recipe_ranks import build_model, calibration_batches
from typer.testing import CliRunner

import prunekit as pk
from prunekit.cli import app

ROOT = Path(__file__).resolve().parents[2]
PRUNE = """_type: Recipe
model: tests.distributed.recipe_ranks:build_model
calibration: tests.distributed.recipe_ranks:calibration_batches
prune: {_type: UnstructuredConfig, sparsity: 0.5, criterion: wanda, scope: layer}
"""
SCAN = """_type: Recipe
model: tests.recipe_entry_points:build_model
data: tests.recipe_entry_points:loaders
prune: {_type: UnstructuredConfig, sparsity: 0.5}
"""


def torchrun(*command: str) -> subprocess.CompletedProcess[str]:
    """`torchrun --standalone --nproc_per_node 2 <command>`; a hung run fails after 150 s instead of hanging."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *command]
    run = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=150)
    assert run.returncode == 0, run.stderr[-6000:]
    return run


def one_process(*args: str) -> str:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each rank runs
    try:
        result = CliRunner().invoke(app, list(args))
    finally:
        torch.set_num_threads(threads)
    assert result.exit_code == 0, result.output
    return result.output


def test_prune_recipe_on_two_ranks_saves_what_one_process_saves(tmp_path: Path) -> None:
    recipe = tmp_path / "r.yaml"
    recipe.write_text(PRUNE)
    one_process("prune", "--recipe", str(recipe), "--out", str(tmp_path / "one"), "--no-progress")
    run = torchrun("-m", "prunekit", "prune", "--recipe", str(recipe), "--out", str(tmp_path / "two"), "--no-progress")
    assert run.stdout.count("pruned model:") == 1  # rank 0 alone prints (and writes)
    one, two = (load_file(str(tmp_path / d / "pruned.safetensors")) for d in ("one", "two"))
    assert one.keys() == two.keys() and len(one) > 0
    for key in one:
        assert torch.equal(one[key], two[key]), key
    # the comparison can fail: one rank's share alone picks other weights than every batch does
    alone = pk.prune(build_model(), pk.UnstructuredConfig(sparsity=0.5, criterion="wanda", scope="layer"),
                     data=calibration_batches()[0::2])
    full = pk.load(tmp_path / "two" / "pruned.safetensors", build_model())
    assert not torch.equal(pk.finalize(alone)[0].weight == 0, full[0].weight == 0)


def test_console_script_under_torchrun_runs_the_same_recipe(tmp_path: Path) -> None:
    recipe = tmp_path / "r.yaml"
    recipe.write_text(PRUNE.replace("sparsity: 0.5", "sparsity: 0.75"))
    args = ["prune", "--recipe", str(recipe), "--no-progress", "--out"]
    one_process(*args, str(tmp_path / "one"))
    script = Path(sys.executable).with_name("prunekit")  # the `prunekit` entry point pip installed
    run = torchrun("--no-python", str(script), *args, str(tmp_path / "two"))
    assert run.stdout.count("pruned model:") == 1
    one, two = (load_file(str(tmp_path / d / "pruned.safetensors")) for d in ("one", "two"))
    assert one.keys() == two.keys() and all(torch.equal(one[k], two[k]) for k in one)


@pytest.mark.parametrize("command", [["report", "--model", "m:f", "--data", "d:f", "--baseline", "a", "--pruned", "b"],
                                     ["export", "model.safetensors"], ["demo", "--quick"], ["inspect", "x"]])
def test_per_process_commands_refuse_torchrun(command: list[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    result = CliRunner().invoke(app, command)
    assert result.exit_code == 2
    assert f"rank 1 of 2: error: prunekit {command[0]} cannot run under torchrun" in result.output
