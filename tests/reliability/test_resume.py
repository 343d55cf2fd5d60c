"""Resume: a run interrupted at a random point and resumed ends bit-identical to an uninterrupted one.

For each runner (gradual pruning in `finetune`, `prune_iteratively`, `sensitivity`, `search`)
and for `prunekit prune --recipe`:
(a) in process: a HOOK raises at a random batch/evaluation, then a fresh build resumes;
(b) a child process is SIGKILLed at a random event and a fresh process resumes.
Both compare every final tensor with `torch.equal` and every metric with `==`.

The children are forked from a forkserver that has only imported torch, prunekit and the
runners (`resume_forkserver.py`; no run state), which makes a fresh process cost milliseconds
instead of the seconds of importing torch; the slow test also drives the real `prunekit`
console script in fresh interpreters.
"""

from __future__ import annotations

import multiprocessing
import os
import random
import shutil
import signal
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import pytest
import torch

import prunekit as pk
from tests.reliability import resume_runs as rr

ROOT = Path(__file__).resolve().parents[2]
# Events (batches fetched, evaluations) each uninterrupted run makes: the kill point is drawn below it.
EVENTS = {"gradual": 18, "iterative": 24, "sensitivity": 10, "search": 3, "search_tpe": 7}
SEED = int(os.environ.get("PRUNEKIT_RESUME_SEED", random.randrange(2**31)))


class Interrupted(KeyboardInterrupt):
    """Raised by the HOOK: Ctrl-C at a chosen point (no `except Exception` swallows it)."""


@pytest.fixture(autouse=True)
def _deterministic():
    threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    rr.deterministic()
    yield
    rr.HOOK = None
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(deterministic)


@pytest.fixture(scope="module")
def scratch():
    # SQLite commits fsync; on a RAM-backed folder the search's many small commits cost nothing.
    base = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None
    with tempfile.TemporaryDirectory(prefix="prunekit-resume-", dir=base) as d:
        yield Path(d)


def _reference(name: str, scratch: Path) -> tuple[dict, dict]:
    (scratch / f"ref-{name}").mkdir(exist_ok=True)
    return rr.reference(name, str(scratch / f"ref-{name}"))


def assert_identical(got: tuple[dict, dict], want: tuple[dict, dict], where: str) -> None:
    tensors, metrics = got
    assert tensors.keys() == want[0].keys(), where
    for key, value in want[0].items():
        assert torch.equal(tensors[key], value), f"tensor {key!r} differs after resume, {where}"
    # Epochs that ended before the interruption report their loss in the first process only.
    losses, want_losses = metrics.pop("epoch_losses", {}), want[1].get("epoch_losses", {})
    assert all(want_losses[e] == v for e, v in losses.items()), where
    assert metrics == {k: v for k, v in want[1].items() if k != "epoch_losses"}, where


def _interrupt_at(n: int) -> None:
    count = {"events": 0}

    def hook(_event: str) -> None:
        count["events"] += 1
        if count["events"] == n:
            raise Interrupted

    rr.HOOK = hook


# --------------------------------------------------------------------------------------------
# (a) In-process interruption at a random point.


@pytest.mark.parametrize("name", rr.DEFAULT)
def test_interrupted_in_process_resumes_bit_identical(name: str, scratch: Path) -> None:
    want = _reference(name, scratch)
    at = random.Random(f"{SEED}-{name}").randrange(2, EVENTS[name] + 1)
    ckpt = scratch / f"a-{name}"
    ckpt.mkdir()
    _interrupt_at(at)
    with pytest.raises(Interrupted):
        rr.RUNNERS[name](ckpt=str(ckpt))
    rr.HOOK = None
    torch.manual_seed(12345)  # the interrupted process's RNGs are wherever it stopped: resume must not care
    got = rr.RUNNERS[name](ckpt=str(ckpt), resume=True)
    assert_identical(got, want, f"interrupted at event {at} (PRUNEKIT_RESUME_SEED={SEED})")
    assert any(ckpt.iterdir())


def test_iterative_resumes_from_a_round_boundary(scratch: Path) -> None:
    """Killed in round 2 before its first step checkpoint: the round-end state must carry the shuffle."""
    want = _reference("iterative", scratch)
    ckpt = scratch / "boundary"
    ckpt.mkdir()
    _interrupt_at(15)  # 12 batches in round 1; round 2's first checkpoint comes after its third step
    with pytest.raises(Interrupted):
        rr.run_iterative(str(ckpt))
    rr.HOOK = None
    assert_identical(rr.run_iterative(str(ckpt), resume=True), want, "interrupted at event 15")


def test_channel_group_scan_resumes_bit_identical(tmp_path: Path) -> None:
    from tests.models import ResidualCNN

    def scan(ckpt: Path | None, resume: bool = False) -> dict:
        torch.manual_seed(0)
        model = ResidualCNN(width=8)
        x, y = torch.rand(32, 1, 8, 8), torch.randint(0, 10, (32,))
        evaluate = rr.scan_evaluate_on(x, y)
        return pk.sensitivity(model, pk.ChannelConfig(ratio=0.5), evaluate, [0.25, 0.5], higher_is_better=False,
                              example_inputs=x[:1], checkpoint_dir=ckpt, resume=resume).to_dict()

    want = scan(None)
    _interrupt_at(random.Random(f"{SEED}-groups").randrange(2, 2 * len(want["units"]) + 2))
    with pytest.raises(Interrupted):
        scan(tmp_path)
    rr.HOOK = None
    assert scan(tmp_path, resume=True) == want


def test_existing_checkpoint_is_not_overwritten_without_resume(tmp_path: Path) -> None:
    _interrupt_at(9)
    with pytest.raises(Interrupted):
        rr.run_gradual(str(tmp_path))
    rr.HOOK = None
    before = (tmp_path / "finetune.ckpt.safetensors").read_bytes()
    with pytest.raises(pk.CheckpointError, match="resume=True"):
        rr.run_gradual(str(tmp_path))
    assert (tmp_path / "finetune.ckpt.safetensors").read_bytes() == before
    with pytest.raises(pk.ConfigError, match="needs checkpoint_dir"):
        rr.run_gradual(None, resume=True)


def test_checkpoint_of_another_run_is_refused(tmp_path: Path) -> None:
    _interrupt_at(5)
    with pytest.raises(Interrupted):
        rr.run_sensitivity(str(tmp_path))
    rr.HOOK = None
    model, (_, held_out) = rr.mnist_mlp(), rr.mnist_loaders()
    with pytest.raises(pk.CheckpointError, match="levels"):
        pk.sensitivity(model, pk.UnstructuredConfig(sparsity=0.5), rr._scan_evaluate(held_out), [0.5],
                       checkpoint_dir=tmp_path, resume=True)


def test_run_state_round_trips_without_pickle(tmp_path: Path) -> None:
    from prunekit.storage.runstate import load_state, rng_state, save_state

    model = rr.mnist_mlp()
    opt = torch.optim.Adam(model.parameters())
    model(torch.rand(2, 1, 28, 28)).sum().backward()
    opt.step()
    state = {"opt": opt.state_dict(), "rng": rng_state(), "t": (1, 2.5, None), "nan": float("nan")}
    path = save_state(tmp_path / "s.ckpt.safetensors", "demo", state)
    assert path.read_bytes()[:2] not in (b"\x80\x04", b"PK")  # not a pickle nor a torch.save zip
    back = load_state(path, "demo")
    assert back["t"] == (1, 2.5, None) and back["nan"] != back["nan"]
    assert set(back["opt"]["state"]) == set(range(6))  # int keys survive JSON
    fresh = torch.optim.Adam(rr.mnist_mlp().parameters())
    fresh.load_state_dict(back["opt"])
    assert torch.equal(fresh.state_dict()["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"])
    assert back["rng"]["python"] == state["rng"]["python"]
    with pytest.raises(pk.CheckpointError, match="not 'other'"):
        load_state(path, "other")
    (tmp_path / "p.ckpt.safetensors").write_bytes(b"\x80\x04\x95" + b"\x00" * 64)
    with pytest.raises(pk.CheckpointError, match="pickle"):
        load_state(tmp_path / "p.ckpt.safetensors", "demo")


# --------------------------------------------------------------------------------------------
# (b) SIGKILL of a child process at a random point, resumed in a fresh process.


@pytest.fixture(scope="module")
def forkserver():
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["tests.reliability.resume_forkserver"])
    yield ctx
    # Stop it (and reap it) rather than leave a process holding torch for the rest of the session.
    from multiprocessing import forkserver as server

    stop = getattr(server._forkserver, "_stop", None)
    if stop is not None:
        stop()


def _start(ctx: Any, name: str, kwargs: dict, out: Path, delay_s: float) -> tuple[Any, Any]:
    recv, send = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=rr.child, args=(name, kwargs, send, str(out), delay_s))
    proc.start()
    send.close()
    return proc, recv


def kill_at(ctx: Any, name: str, kwargs: dict, out: Path, events: int, delay_s: float = 0.01) -> bool:
    """Run a child until it reports `events` events, then SIGKILL it; True if it died mid-run.

    False when the child finished first; an error in the child fails the test.
    """
    proc, recv = _start(ctx, name, kwargs, out, delay_s)
    seen, finished = 0, False
    try:
        while seen < events and recv.poll(120):
            if recv.recv() == "done":
                finished = True
                break
            seen += 1
    except EOFError:
        pass
    os.kill(proc.pid, signal.SIGKILL)
    proc.join(60)
    recv.close()
    assert proc.exitcode in (0, -signal.SIGKILL), f"the {name} child failed (exit code {proc.exitcode})"
    return proc.exitcode == -signal.SIGKILL and not finished


def finish(ctx: Any, name: str, kwargs: dict, out: Path) -> tuple[dict, dict]:
    """Resume to the end in a fresh child; its result."""
    proc, recv = _start(ctx, name, {**kwargs, "resume": True}, out, 0.0)
    while recv.poll(300):  # drain the progress reports so the child never blocks on a full pipe
        try:
            recv.recv()
        except EOFError:
            break
    proc.join(60)
    assert proc.exitcode == 0, f"the resumed {name} run failed (exit code {proc.exitcode})"
    return rr.load_result(out)


def kill_and_resume(ctx: Any, name: str, scratch: Path, tag: str, kills: int = 1) -> int:
    """`kills` SIGKILLs at random events, each followed by a resume that is killed next; then finish."""
    rng = random.Random(f"{SEED}-{name}-{tag}")
    ckpt, out = scratch / f"{tag}-{name}", scratch / f"{tag}-{name}-out"
    ckpt.mkdir()
    died, points = 0, []
    for i in range(kills):
        points.append(rng.randrange(1, EVENTS[name]))
        died += kill_at(ctx, name, {"ckpt": str(ckpt), "resume": i > 0}, out, points[-1])
    assert died >= 1, "no child was killed mid-run (each finished first)"
    got = finish(ctx, name, {"ckpt": str(ckpt)}, out)
    assert_identical(got, _reference(name, scratch), f"killed after events {points} (PRUNEKIT_RESUME_SEED={SEED})")
    return died


@pytest.mark.parametrize("name", rr.DEFAULT)
def test_sigkilled_run_resumes_bit_identical_in_a_fresh_process(name: str, scratch: Path, forkserver: Any) -> None:
    assert kill_and_resume(forkserver, name, scratch, "b") == 1


@pytest.mark.slow
@pytest.mark.parametrize("name", list(rr.RUNNERS))
def test_repeated_kills_resume_bit_identical(name: str, scratch: Path, forkserver: Any) -> None:
    cycles = 0
    for i in range(5):  # five independent runs, each killed three times before it may finish
        cycles += kill_and_resume(forkserver, name, scratch, f"slow{i}", kills=3)
    print(f"{name}: {cycles} kill-and-resume cycles passed")
    assert cycles >= 10


# --------------------------------------------------------------------------------------------
# The command line: `prunekit prune --recipe ... --checkpoint-dir d`, killed, then `--resume`.


def _cli_args(recipe: Path, out: Path, ckpt: Path, resume: bool) -> list[str]:
    return ["--recipe", str(recipe), "--out", str(out), "--no-progress", "--checkpoint-dir", str(ckpt),
            "--checkpoint-every", "2", *(["--resume"] if resume else [])]


def test_cli_prune_killed_then_resumed_writes_the_same_checkpoint(tmp_path: Path, forkserver: Any) -> None:
    from safetensors.torch import load_file

    recipe = rr.recipe_yaml(tmp_path / "recipe.yaml")
    rr.prune_cli(["--recipe", str(recipe), "--out", str(tmp_path / "ref"), "--no-progress"])
    ckpt, out = tmp_path / "ckpt", tmp_path / "out"
    at = random.Random(f"{SEED}-cli").randrange(1, 18)
    assert kill_at(forkserver, "cli", {"args": _cli_args(recipe, out, ckpt, False)}, tmp_path / "r1", at)
    assert not (out / "pruned.safetensors").exists()
    finish(forkserver, "cli", {"args": _cli_args(recipe, out, ckpt, True)}, tmp_path / "r2")
    want, got = load_file(str(tmp_path / "ref" / "pruned.safetensors")), load_file(str(out / "pruned.safetensors"))
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
    assert (out / "pruned.safetensors").read_bytes() == (tmp_path / "ref" / "pruned.safetensors").read_bytes()


def test_recipe_interrupted_in_process_resumes(tmp_path: Path) -> None:
    from prunekit.recipes.run import run_recipe

    recipe = pk.load_recipe(rr.recipe_yaml(tmp_path / "recipe.yaml"))
    run_recipe(recipe, tmp_path / "ref", progress=False)
    _interrupt_at(random.Random(f"{SEED}-recipe").randrange(2, 19))
    with pytest.raises(Interrupted):
        run_recipe(recipe, tmp_path / "out", progress=False, checkpoint_dir=tmp_path / "ckpt", checkpoint_every=2)
    rr.HOOK = None
    run_recipe(recipe, tmp_path / "out", progress=False, checkpoint_dir=tmp_path / "ckpt", checkpoint_every=2,
               resume=True)
    want = (tmp_path / "ref" / "pruned.safetensors").read_bytes()
    assert (tmp_path / "out" / "pruned.safetensors").read_bytes() == want


@pytest.mark.slow
def test_console_script_killed_and_resumed(tmp_path: Path) -> None:
    """The real `prunekit` executable in fresh interpreters, killed at random times, three times."""
    recipe = rr.recipe_yaml(tmp_path / "recipe.yaml")
    rr.prune_cli(["--recipe", str(recipe), "--out", str(tmp_path / "ref"), "--no-progress"])
    ckpt, out = tmp_path / "ckpt", tmp_path / "out"
    exe = shutil.which("prunekit")
    if exe is None:
        pytest.skip("the prunekit console script is not installed")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "PRUNEKIT_TEST_BATCH_DELAY_S": "0.05"}
    rng, killed = random.Random(f"{SEED}-console"), 0
    for i in range(3):
        proc = subprocess.Popen([exe, "prune", *_cli_args(recipe, out, ckpt, i > 0)], env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        target, seen = rng.randrange(1, 12), 0
        for line in proc.stdout:  # type: ignore[union-attr]
            seen += line.startswith("batch")
            if seen >= target:
                break
        proc.send_signal(signal.SIGKILL)
        proc.wait(60)
        killed += proc.returncode == -signal.SIGKILL
    done = subprocess.run([exe, "prune", *_cli_args(recipe, out, ckpt, True)], env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    print(f"console script: {killed} kill-and-resume cycles passed")
    assert killed >= 1
    assert (out / "pruned.safetensors").read_bytes() == (tmp_path / "ref" / "pruned.safetensors").read_bytes()
