"""Crash safety: a process SIGKILLed while saving leaves the previous file intact and loadable.

Each cycle starts a writer process that saves over an existing good file again and again, waits
until a write is under way (its temporary file exists), kills it with SIGKILL at a random moment,
and then checks the target: it must load and hold either the previous content or the writer's
complete new content, never a mix or a truncation. Writers are forked from the test process
(as DataLoader workers are), so a cycle costs milliseconds, not an interpreter start; the slow
variant starts a fresh interpreter per cycle, like a real crashed run.
"""

from __future__ import annotations

import base64  # noqa: F401  (render_html's lazy imports; see _Forked)
import html  # noqa: F401
import json
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import safetensors.torch  # noqa: F401  (save's lazy import; see _Forked)
import torch
from torch import nn

import prunekit as pk
import prunekit.deploy.quantize  # noqa: F401  (imported lazily by save: import it before forking, see _Forked)
from prunekit.deploy.checkpoint import read_checkpoint
from prunekit.measure.report import Report

ROOT = Path(__file__).resolve().parents[2]


def big_model(seed: int, width: int = 1536) -> nn.Module:
    """~19 MB of fp32 weights (width 1536), dense so nothing compresses: the write is long."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(width, width), nn.ReLU(), nn.Linear(width, width))


class _Forked:
    """Run `work()` forever in a forked child; `pid`, and `wait()` after it was killed.

    The child must not import anything (an import lock held by another thread at fork time
    would deadlock it), so what `save` and `Report.save` import lazily is imported above.
    """

    def __init__(self, work: Callable[[], None]) -> None:
        self.pid = os.fork()
        if self.pid == 0:  # the child: never returns into pytest
            try:
                torch.set_num_threads(1)  # what DataLoader workers do after fork
                while True:
                    work()
            finally:
                os._exit(1)

    def wait(self, timeout: float) -> None:
        os.waitpid(self.pid, 0)


def _temp_files(folder: Path) -> list[Path]:
    return sorted(folder.glob(".*.tmp"))


def _kill_mid_write(start: Callable[[], Any], folder: Path, rng: random.Random, max_delay_s: float) -> bool:
    """Start a writer, wait for its temporary file, SIGKILL it after a random delay.

    Returns whether the kill landed inside a write (a temporary file was left behind).
    """
    for stale in _temp_files(folder):
        stale.unlink()
    handle = start()  # a multiprocessing.Process or a subprocess.Popen
    try:
        deadline = time.monotonic() + 30
        while not _temp_files(folder):
            if time.monotonic() > deadline:
                raise AssertionError("the writer never started writing")
            time.sleep(0.0005)
        time.sleep(rng.uniform(0, max_delay_s))
    finally:
        os.kill(handle.pid, signal.SIGKILL)
        handle.wait(timeout=10)
    return bool(_temp_files(folder))


def _same(state: dict[str, torch.Tensor], model: nn.Module) -> bool:
    ref = model.state_dict()
    return state.keys() == ref.keys() and all(torch.equal(state[k], ref[k]) for k in ref)


def test_sigkill_while_saving_a_checkpoint_keeps_the_previous_file(tmp_path) -> None:
    rng = random.Random(0)
    path = tmp_path / "model.safetensors"
    previous = big_model(0)
    pk.save(previous, path)
    cycles = passed = mid_write = 0
    for cycles in range(1, 7):
        new = big_model(cycles)
        mid_write += _kill_mid_write(lambda: _Forked(lambda: pk.save(new, path)), tmp_path, rng, 0.05)  # noqa: B023
        state, _ = read_checkpoint(path)  # raises CheckpointError on a torn file
        if _same(state, new):
            previous = new
        else:
            assert _same(state, previous), f"cycle {cycles}: the checkpoint is neither the old nor the new model"
        passed += 1
    pk.load(path, big_model(99))  # and the survivor loads into a model through the public API
    print(f"checkpoint kill cycles passed: {passed}/{cycles}, {mid_write} killed mid-write")
    assert passed == cycles
    assert mid_write >= 1, "no kill landed inside a write: the test proved nothing"


def _report_data(title: str, log: str) -> dict:
    """A complete report document (the fields `render_markdown` reads), written by hand: fast."""
    side = {"accuracy": 0.9, "params": 1000, "nonzero_params": 500, "flops": 2000, "size_bytes": 4000,
            "size_bytes_lzma": 3000, "weights_bytes": 4000, "peak_activation_bytes_batch1": 64,
            "peak_activation_bytes_batch32": 2048, "sparsity": 0.5, "layers": {"0": 0.5, "2": 0.5}}
    return {"title": title, "examples": 64, "verdicts": ["accuracy within 1 point: yes"],
            "environment": {"cpu": "cpu", "threads": 1, "torch": torch.__version__, "prunekit": "0", "seed": 0},
            "baseline": side, "pruned": side, "curve": [],
            "latency": {"repeats": 1, "warmup": 0, "by_batch": [
                {"batch_size": 1, "baseline_ms_p50": 1.0, "baseline_ms_p99": 1.0, "pruned_ms_p50": 1.0,
                 "pruned_ms_p99": 1.0, "speedup": 1.0}]},
            "accuracy": {"top5_k": 2, "top5": {"baseline": 1.0, "pruned": 1.0}, "agreement": 0.9,
                         "per_class": [{"class": "0", "count": 64, "baseline": 0.9, "pruned": 0.9, "delta": 0.0}]},
            "sections": [{"title": "log", "markdown": log}]}


def test_sigkill_while_writing_a_report_keeps_the_previous_files(tmp_path, monkeypatch) -> None:
    import prunekit.measure.report

    # The PNGs are rendered before the first write, so they only slow the loop; the writes are real.
    monkeypatch.setattr(prunekit.measure.report, "plots", lambda d: {})
    rng = random.Random(1)
    out = tmp_path / "report"
    # A few MB of report (a long appended section), so each file takes a while to write.
    versions = [_report_data(f"version {i}", f"run {i}: " + "x" * 3_000_000) for i in range(6)]
    Report(versions[0]).save(out)
    names = ("report.json", "report.md", "report.html")
    seen = {n: {(out / n).read_bytes()} for n in names}
    passed = mid_write = 0
    for i in range(1, len(versions)):
        report = Report(versions[i])
        mid_write += _kill_mid_write(lambda: _Forked(lambda: report.save(out)), out, rng, 0.003)  # noqa: B023
        loaded = json.loads((out / "report.json").read_text())  # valid JSON, whole
        assert loaded["title"].startswith("version ")
        # Each file is exactly some complete version's bytes (not truncated, not interleaved).
        Report(versions[i]).save(tmp_path / "expected")
        for n in names:
            seen[n].add((tmp_path / "expected" / n).read_bytes())
            assert (out / n).read_bytes() in seen[n], f"cycle {i}: {n} is torn"
        passed += 1
    print(f"report kill cycles passed: {passed}/{len(versions) - 1}, {mid_write} killed mid-write")
    assert passed == len(versions) - 1
    assert mid_write >= 1, "no kill landed inside a write: the test proved nothing"


@pytest.mark.slow
def test_sigkill_fresh_interpreter_many_cycles(tmp_path) -> None:
    """30 cycles, each a fresh `python` saving a ~75 MB checkpoint, killed at a random moment."""

    def start_for(path: Path, seed: int) -> Callable[[], Any]:
        code = (f"import sys; sys.path.insert(0, {str(ROOT)!r}); from tests.reliability.test_crash_safety import "
                f"_save_forever_wide; _save_forever_wide({str(path)!r}, {seed})")

        def start() -> subprocess.Popen:
            return subprocess.Popen([sys.executable, "-c", code], env={**os.environ, "OMP_NUM_THREADS": "1"})

        return start

    cycles = 30
    rng = random.Random(2)
    path = tmp_path / "model.safetensors"
    previous = big_model(0, 3072)
    pk.save(previous, path)
    passed = mid_write = 0
    for cycle in range(1, cycles + 1):
        new = big_model(cycle, 3072)
        mid_write += _kill_mid_write(start_for(path, cycle), tmp_path, rng, 0.3)
        state, _ = read_checkpoint(path)
        if _same(state, new):
            previous = new
        else:
            assert _same(state, previous), f"cycle {cycle}: the checkpoint is neither the old nor the new model"
        passed += 1
    print(f"fresh-interpreter kill cycles passed: {passed}/{cycles}, {mid_write} killed mid-write")
    assert passed == cycles and mid_write >= 1


def _save_forever_wide(path: str, seed: int) -> None:
    model = big_model(seed, 3072)
    while True:
        pk.save(model, path)


def test_model_cache_install_moves_the_marker_last(tmp_path, monkeypatch) -> None:
    """The LLM cache counts as complete when config.json exists: a crash mid-install leaves none."""
    from prunekit.zoo import llm

    src, dst = tmp_path / "src", tmp_path / "cache"
    src.mkdir()
    dst.mkdir()
    for name in ("config.json", "model.safetensors", "tokenizer.json", "a.json"):
        (src / name).write_text(name)
    moved: list[str] = []
    real = os.replace

    def crash_on_third(a: Path, b: Path) -> None:
        if len(moved) == 2:
            raise KeyboardInterrupt  # the process dies here
        moved.append(Path(a).name)
        real(a, b)

    monkeypatch.setattr(llm.os, "replace", crash_on_third)
    with pytest.raises(KeyboardInterrupt):
        llm.install_files(src, dst)
    assert not (dst / "config.json").exists()
    monkeypatch.setattr(llm.os, "replace", real)
    llm.install_files(src, dst)
    assert sorted(p.name for p in dst.iterdir()) == ["a.json", "config.json", "model.safetensors", "tokenizer.json"]
