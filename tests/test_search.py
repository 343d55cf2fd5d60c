"""Optuna search: measured trials, SQLite by default, resumption, and a shared PostgreSQL study."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch
import yaml
from typer.testing import CliRunner

import prunekit as pk
from prunekit.allocation.search import SearchConfig, SearchError, SearchResult, open_storage, search
from prunekit.cli import app
from tests.recipe_entry_points import build_model, loaders

optuna = pytest.importorskip("optuna")
ROOT = Path(__file__).resolve().parents[1]
TINY = {"finetune_steps": 2, "latency_repeats": 2}


def _run(storage: str, trials: int, evaluate=None, **space) -> SearchResult:
    model = build_model()
    train, held_out = loaders()
    evaluate = evaluate or (lambda m: pk.accuracy(m, held_out))
    config = SearchConfig(trials=trials, **{**TINY, **space})
    return search(model, pk.UnstructuredConfig(sparsity=0.5), train, evaluate, torch.zeros(1, 12), config,
                  storage=storage)


def _trials(storage: str, name: str = "prunekit") -> list:
    return optuna.load_study(study_name=name, storage=storage).get_trials(deepcopy=False)


def test_search_measures_trials_and_resumes_to_the_budget(tmp_path) -> None:
    url = f"sqlite:///{tmp_path / 'study.db'}"
    # levels >= 0.5 keep every trial above min_sparsity, so the Pareto front (feasible trials only)
    # is never empty; with level 0 on offer, three unseeded trials were all infeasible now and then
    levels = (0.5, 0.7, 0.9)
    result = _run(url, 3, min_sparsity=0.3, levels=levels)
    assert result.n_complete == 3 and result.best
    for t in result.best:
        assert 0.0 <= t["measured"]["accuracy"] <= 1.0 and t["measured"]["latency_ms"] > 0
        assert set(t["levels"]) == {"0", "2"}
    trials = _trials(url)
    for t in trials:  # the measured sparsity matches the sampled levels (10 % tolerance: biases)
        chosen = [t.params["level/0"], t.params["level/2"]]
        assert 0 <= t.user_attrs["sparsity"] <= max(chosen) + 1e-6
        assert t.user_attrs["constraint"] == pytest.approx(0.3 - t.user_attrs["sparsity"])
    rules = result.best_config(pk.UnstructuredConfig(sparsity=0.5))
    assert isinstance(rules, pk.PerLayer) and set(rules.rules) == {"0", "2"}
    again = _run(url, 3, levels=levels)  # budget already met: nothing runs
    assert again.n_complete == 3 and len(_trials(url)) == 3
    more = _run(url, 5, levels=levels)
    numbers = [t.number for t in _trials(url)]
    assert more.n_complete == 5 and sorted(numbers) == list(range(5))


def test_interrupted_study_resumes_without_duplicating_trials(tmp_path) -> None:
    url = f"sqlite:///{tmp_path / 'study.db'}"
    calls = {"n": 0}

    def flaky(model: torch.nn.Module) -> float:
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt  # Ctrl-C in the middle of the second trial
        return 0.5

    with pytest.raises(KeyboardInterrupt):
        _run(url, 4, evaluate=flaky)
    # a worker killed mid-trial leaves a RUNNING trial behind; resumption marks it failed
    study = optuna.load_study(study_name="prunekit", storage=url)
    orphan = study.ask()
    orphan.set_user_attr("worker", f"{socket.gethostname()}:{_dead_pid()}")
    result = _run(url, 4, evaluate=lambda m: 0.5)
    states = [t.state for t in _trials(url)]
    complete = optuna.trial.TrialState.COMPLETE
    assert result.n_complete == 4 and states.count(complete) == 4
    assert states.count(optuna.trial.TrialState.FAIL) == 2  # the interrupted and the orphaned trial
    assert optuna.trial.TrialState.RUNNING not in states
    numbers = [t.number for t in _trials(url)]
    assert len(numbers) == len(set(numbers))


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_unreachable_database_fails_clearly_without_fallback(tmp_path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    url = f"postgresql://user:hunter2@127.0.0.1:{port}/db"
    with pytest.raises(SearchError, match="Not falling back") as info:
        open_storage(url)
    assert "hunter2" not in str(info.value) and str(port) in str(info.value)
    with pytest.raises(SearchError, match="not a database URL"):
        open_storage(str(tmp_path / "study.db"))
    assert not list(tmp_path.iterdir())


def test_cli_search_with_yaml_recipe(tmp_path) -> None:
    recipe = {
        "_type": "SearchRecipe",
        "model": "tests.recipe_entry_points:build_model",
        "data": "tests.recipe_entry_points:loaders",
        "prune": {"_type": "UnstructuredConfig", "sparsity": 0.5},
        "search": {"_type": "SearchConfig", "trials": 2, **TINY},
        "input_shape": [1, 12],
    }
    path = tmp_path / "search.yaml"
    path.write_text(yaml.safe_dump(recipe))
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["search", "--recipe", str(path), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "2 finished trials" in result.output and (out / "search.db").exists()
    best = pk.load_recipe(out / "best_recipe.yaml")
    assert isinstance(best, pk.PerLayer)
    bad = CliRunner().invoke(app, ["search", "--recipe", str(path), "--storage", "nonsense"])
    assert bad.exit_code == 2 and "not a database URL" in bad.output


# --------------------------------------------------------------------------------------------
# A real PostgreSQL server on loopback, shared by two worker processes.

_WORKER = """
import sys, time, pathlib, torch
import prunekit as pk
from prunekit.allocation.search import SearchConfig, search
from tests.recipe_entry_points import build_model, loaders
url, ready, go = sys.argv[1], pathlib.Path(sys.argv[2]), pathlib.Path(sys.argv[3])
model, (train, held_out) = build_model(), loaders()
torch.optim.Adam(model.parameters())  # its first use imports torch._dynamo: do it before the start line
ready.write_text("ok")
while not go.exists():
    time.sleep(0.05)
def evaluate(m):
    time.sleep(0.1)  # a trial long enough for the two workers to interleave
    return pk.accuracy(m, held_out)
config = SearchConfig(trials=6, finetune_steps=2, latency_repeats=2, study_name="shared")
print(search(model, pk.UnstructuredConfig(sparsity=0.5), train, evaluate, torch.zeros(1, 12), config,
             storage=url).n_complete)
"""


def _pg_bin(name: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    candidates = sorted(Path("/usr/lib/postgresql").glob(f"*/bin/{name}"))
    return str(candidates[-1]) if candidates else None


def _as_postgres(cmd: list[str]) -> list[str]:
    return ["runuser", "-u", "postgres", "--", *cmd] if os.geteuid() == 0 else cmd


@pytest.fixture
def postgres_url():
    if _pg_bin("initdb") is None and os.geteuid() == 0 and shutil.which("apt-get"):
        subprocess.run(["apt-get", "install", "-y", "-q", "postgresql"], capture_output=True, timeout=600)
    initdb, pg_ctl = _pg_bin("initdb"), _pg_bin("pg_ctl")
    if initdb is None or pg_ctl is None:
        pytest.skip("PostgreSQL server binaries (initdb, pg_ctl) are not installed and could not be installed")
    if os.geteuid() == 0 and shutil.which("runuser") is None:
        pytest.skip("running as root without runuser: cannot start PostgreSQL as an unprivileged user")
    import psycopg  # noqa: F401  (prunekit[search] installs psycopg 3: the driver optuna's URL below names)
    root = Path(tempfile.mkdtemp(prefix="prunekit-pg-"))  # not under pytest's 0700 root-owned tmp
    if os.geteuid() == 0:
        shutil.chown(root, "postgres", "postgres")
    data, log = root / "data", root / "server.log"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    init = subprocess.run(_as_postgres([initdb, "-D", str(data), "-U", "postgres", "--auth=trust", "-E", "UTF8"]),
                          capture_output=True, text=True, timeout=120)
    if init.returncode != 0:
        shutil.rmtree(root, ignore_errors=True)
        pytest.skip(f"initdb failed: {init.stderr.strip()[-300:]}")
    options = f"-p {port} -k {root} -c listen_addresses=127.0.0.1 -c fsync=off"
    start = subprocess.run(_as_postgres([pg_ctl, "-D", str(data), "-o", options, "-l", str(log), "-w", "start"]),
                           capture_output=True, text=True, timeout=120)
    if start.returncode != 0:
        shutil.rmtree(root, ignore_errors=True)
        pytest.skip(f"PostgreSQL did not start: {start.stderr.strip()[-300:]}")
    try:
        yield f"postgresql+psycopg://postgres@127.0.0.1:{port}/postgres"
    finally:
        subprocess.run(_as_postgres([pg_ctl, "-D", str(data), "-m", "immediate", "-w", "stop"]),
                       capture_output=True, timeout=120)
        shutil.rmtree(root, ignore_errors=True)


def test_two_workers_share_one_postgres_study(postgres_url, tmp_path) -> None:
    # worker 1 is a separate process; worker 2 is this test's process (it has torch imported
    # already, which keeps the test short on a busy machine)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    ready, go = tmp_path / "ready", tmp_path / "go"
    other = subprocess.Popen([sys.executable, "-c", _WORKER, postgres_url, str(ready), str(go)],
                             cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not ready.exists():
            assert time.monotonic() < deadline, "the worker process did not start"
            assert other.poll() is None, other.communicate()[1][-3000:]
            time.sleep(0.05)
        go.write_text("go")  # start both workers together
        model, (train, held_out) = build_model(), loaders()

        def evaluate(m: torch.nn.Module) -> float:
            time.sleep(0.1)
            return pk.accuracy(m, held_out)

        config = SearchConfig(trials=6, finetune_steps=2, latency_repeats=2, study_name="shared")
        mine = search(model, pk.UnstructuredConfig(sparsity=0.5), train, evaluate, torch.zeros(1, 12), config,
                      storage=postgres_url)
        out, err = other.communicate(timeout=240)
    finally:
        with contextlib.suppress(ProcessLookupError):
            other.kill()
    assert other.returncode == 0, err[-3000:]
    trials = _trials(postgres_url, "shared")
    complete = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(complete) == len(trials)  # none lost, failed or left running
    assert 6 <= len(complete) <= 7  # the budget, plus at most one in-flight trial of the other worker
    assert sorted(t.number for t in trials) == list(range(len(trials)))
    owners = {t.user_attrs["worker"] for t in complete}
    assert len(owners) == 2  # both workers ran trials of the one study
    assert max(mine.n_complete, int(out.strip().splitlines()[-1])) == len(complete)


_DOOMED = """
import sys, time, pathlib
import prunekit as pk
from prunekit.allocation.search import SearchConfig, search
from tests.recipe_entry_points import build_model, loaders
url, inside = sys.argv[1], pathlib.Path(sys.argv[2])
model, (train, held_out) = build_model(), loaders()
def evaluate(m):
    inside.write_text("mid-trial")
    time.sleep(600)  # SIGKILLed here, with its trial RUNNING in the shared study
config = SearchConfig(trials=3, finetune_steps=2, latency_repeats=2, study_name="doomed")
search(model, pk.UnstructuredConfig(sparsity=0.5), train, evaluate, __import__("torch").zeros(1, 12), config,
       storage=url)
"""


def test_worker_sigkilled_mid_trial_leaves_no_running_trial(postgres_url, tmp_path) -> None:
    """A worker killed by SIGKILL mid-trial: the study still reaches its budget, the orphan is failed."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    inside = tmp_path / "inside"
    doomed = subprocess.Popen([sys.executable, "-c", _DOOMED, postgres_url, str(inside)], cwd=ROOT, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not inside.exists():
            assert time.monotonic() < deadline, "the doomed worker never reached its trial"
            assert doomed.poll() is None, doomed.communicate()[1][-3000:]
            time.sleep(0.05)
        doomed.kill()  # SIGKILL: no handler runs, the trial stays RUNNING in the database
        doomed.wait(timeout=30)
    finally:
        with contextlib.suppress(ProcessLookupError):
            doomed.kill()
    running = optuna.trial.TrialState.RUNNING
    assert [t.state for t in _trials(postgres_url, "doomed")] == [running]
    model, (train, held_out) = build_model(), loaders()
    config = SearchConfig(trials=3, study_name="doomed", **TINY)
    result = search(model, pk.UnstructuredConfig(sparsity=0.5), train, lambda m: pk.accuracy(m, held_out),
                    torch.zeros(1, 12), config, storage=postgres_url)
    states = [t.state for t in _trials(postgres_url, "doomed")]
    assert result.n_complete == 3 and states.count(optuna.trial.TrialState.COMPLETE) == 3
    assert states.count(optuna.trial.TrialState.FAIL) == 1 and running not in states
