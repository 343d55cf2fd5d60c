"""The four resumable runners on tiny MNIST-sized models, shared by the tests and their child processes.

Each `run_*` builds everything from seeds, runs once (optionally checkpointing or resuming),
and returns what must match between an uninterrupted run and a killed-and-resumed one: final
tensors (weights with masks) and metrics. `HOOK(event)` is called once per unit of work (a
fetched batch, an evaluation); tests make it raise (an in-process interruption) or report
progress to the parent that will SIGKILL the process.
"""

from __future__ import annotations

import functools
import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset, default_collate

import prunekit as pk

HOOK: Callable[[str], None] | None = None


def _print_and_wait(event: str) -> None:
    print(event, flush=True)
    time.sleep(float(os.environ["PRUNEKIT_TEST_BATCH_DELAY_S"]))


if os.environ.get("PRUNEKIT_TEST_BATCH_DELAY_S"):  # the console-script test: progress on stdout, slowed
    HOOK = _print_and_wait


def _event(name: str) -> None:
    if HOOK is not None:
        HOOK(name)


def deterministic() -> None:
    """The settings under which resumption is bit-identical: one thread, deterministic kernels."""
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)


def mnist_mlp() -> nn.Module:
    """An MNIST-sized MLP (784-64-32-10) with dropout, so training draws random numbers."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(784, 64), nn.ReLU(), nn.Dropout(0.1), nn.Linear(64, 32), nn.ReLU(),
                         nn.Linear(32, 10))


def _data(n: int, seed: int) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 1, 28, 28, generator=g)
    return TensorDataset(x, (x.flatten(1)[:, :10] * 3).argmax(1))  # a learnable random task


def _collate(batch: list[Any]) -> Any:
    _event("batch")
    return default_collate(batch)


def mnist_loaders() -> tuple[DataLoader, DataLoader]:
    """Shuffled training batches (own generator) that call HOOK per batch; a fixed eval set."""
    train = DataLoader(_data(96, 1), batch_size=16, shuffle=True, generator=torch.Generator().manual_seed(2),
                       collate_fn=_collate)
    return train, DataLoader(_data(64, 3), batch_size=64)


def recipe_loaders() -> tuple[DataLoader, None]:
    """The training batches only: the run then skips the report (whose latencies are never identical)."""
    return mnist_loaders()[0], None


def _metrics(model: nn.Module, loader: DataLoader) -> dict[str, float]:
    model.eval()
    with torch.no_grad():
        x, y = next(iter(loader))
        out = model(x)
    return {"accuracy": pk.accuracy(model, loader), "loss": float(nn.functional.cross_entropy(out, y))}


def run_gradual(ckpt: str | None = None, resume: bool = False) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """GradualPruner + distillation in `finetune`, 3 epochs of 6 batches."""
    model, (train, held_out) = mnist_mlp(), mnist_loaders()
    teacher = mnist_mlp()
    pruner = pk.GradualPruner(model, pk.UnstructuredConfig(sparsity=0.8), pk.Cubic(end_step=12, every=2))
    seen: dict[str, float] = {}  # epoch -> mean loss, for the epochs that end in this process

    def record(epoch: int, _step: int, loss: float) -> None:
        seen[str(epoch)] = loss

    step = pk.finetune(model, train, epochs=3, lr=1e-2, teacher=teacher, pruner=pruner, progress=False,
                       callback=record, checkpoint_dir=ckpt, checkpoint_every=2, resume=resume)
    metrics = {"step": step, "epoch_losses": seen, "sparsity": pruner.current_sparsity, **_metrics(model, held_out)}
    return dict(model.state_dict()), metrics


def run_iterative(ckpt: str | None = None, resume: bool = False) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """`prune_iteratively`: 2 rounds of channel removal, each with 2 epochs of distillation."""
    model, (train, held_out) = mnist_mlp(), mnist_loaders()
    teacher = mnist_mlp()
    model, plans = pk.prune_iteratively(model, pk.ChannelConfig(ratio=0.5, exclude=("6",)), torch.zeros(1, 1, 28, 28),
                                        train, rounds=2, epochs=2, teacher=teacher, checkpoint_dir=ckpt,
                                        checkpoint_every=3, resume=resume)
    metrics = {"plans": [p.to_dict() for p in plans], **_metrics(model, held_out)}
    return dict(model.state_dict()), metrics


def _scan_evaluate(held_out: DataLoader) -> Callable[[nn.Module], float]:
    return scan_evaluate_on(*next(iter(held_out)))


def scan_evaluate_on(x: Tensor, y: Tensor) -> Callable[[nn.Module], float]:
    """Loss on a random half of (x, y), drawn from the global RNG; calls HOOK."""

    @torch.no_grad()
    def evaluate(model: nn.Module) -> float:
        _event("evaluate")
        model.eval()
        pick = torch.randperm(len(y))[: len(y) // 2]  # a random subset: the global RNG must resume too
        return float(nn.functional.cross_entropy(model(x[pick]), y[pick]))

    return evaluate


def run_sensitivity(ckpt: str | None = None, resume: bool = False) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """A layer scan at 3 levels (9 cells and the baseline), checkpointed after every 2 cells."""
    model, (_, held_out) = mnist_mlp(), mnist_loaders()
    torch.manual_seed(5)
    table = pk.sensitivity(model, pk.UnstructuredConfig(sparsity=0.5), _scan_evaluate(held_out), [0.3, 0.6, 0.9],
                           higher_is_better=False, checkpoint_dir=ckpt, checkpoint_every=2, resume=resume)
    return dict(model.state_dict()), table.to_dict()


def run_search(ckpt: str, resume: bool = False, trials: int = 3) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """A reproducible Optuna study in SQLite under `ckpt`; the finished trials are the result."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.ERROR)
    model, (train, held_out) = mnist_mlp(), mnist_loaders()

    def evaluate(m: nn.Module) -> float:
        _event("trial")
        return pk.accuracy(m, held_out)

    config = pk.SearchConfig(trials=trials, levels=(0.0, 0.5, 0.9), finetune_steps=3, latency_repeats=1,
                             objectives=("accuracy", "sparsity"), reproducible=True)
    url = f"sqlite:///{Path(ckpt) / 'study.db'}"
    result = pk.search(model, pk.UnstructuredConfig(sparsity=0.5), train, evaluate, torch.zeros(1, 1, 28, 28),
                       config, storage=url)
    study = optuna.load_study(study_name=config.study_name, storage=url)
    done = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    running = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,))
    # none lost, none run twice, none left dangling: the finished trials are the uninterrupted study's
    trials = [[t.params, t.values] for t in done]
    return {}, {"n_complete": result.n_complete, "running": len(running), "trials": trials}


RUNNERS: dict[str, Callable[..., tuple[dict[str, Tensor], dict[str, Any]]]] = {
    "gradual": run_gradual, "iterative": run_iterative, "sensitivity": run_sensitivity, "search": run_search,
    # 7 trials: past the sampler's 5 random start-up trials, so TPE's own draws must resume too (slow test)
    "search_tpe": functools.partial(run_search, trials=7),
}
DEFAULT = ["gradual", "iterative", "sensitivity", "search"]


def recipe_yaml(path: Path) -> Path:
    """A gradual-pruning recipe on the MNIST-sized MLP (3 epochs of 6 batches)."""
    recipe = pk.Recipe(model=f"{__name__}:mnist_mlp", data=f"{__name__}:recipe_loaders",
                       prune=pk.UnstructuredConfig(sparsity=0.8), schedule=pk.Cubic(end_step=12, every=2),
                       finetune=pk.FinetuneConfig(epochs=3, lr=1e-2))
    return pk.save_recipe(recipe, path)


def prune_cli(args: list[str]) -> None:
    """`prunekit prune ARGS` in this process, as the console script runs it."""
    from prunekit.cli import app

    app(["prune", *args], standalone_mode=False)


# --------------------------------------------------------------------------------------------
# The child side of a kill test: run, report each event to the parent, write the result.


def child(name: str, kwargs: dict[str, Any], conn: Any, out: str, delay_s: float) -> None:
    """Run `RUNNERS[name]` (or the CLI for "cli"), sending each HOOK event over `conn`.

    The small `delay_s` per event only slows the run so the parent's SIGKILL lands inside
    it; it changes no number.
    """
    global HOOK
    deterministic()
    if conn is not None:
        def report(event: str) -> None:
            conn.send(event)
            time.sleep(delay_s)

        HOOK = report
    if name == "cli":
        prune_cli(kwargs["args"])
        tensors: dict[str, Tensor] = {}
        metrics: dict[str, Any] = {}
    else:
        tensors, metrics = RUNNERS[name](**kwargs)
    save_result(Path(out), tensors, metrics)
    if conn is not None:
        conn.send("done")


def save_result(out: Path, tensors: dict[str, Tensor], metrics: dict[str, Any]) -> None:
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(out / "tensors.safetensors"))
    (out / "metrics.json").write_text(json.dumps(metrics))


def load_result(out: Path) -> tuple[dict[str, Tensor], dict[str, Any]]:
    from safetensors.torch import load_file

    return load_file(str(out / "tensors.safetensors")), json.loads((out / "metrics.json").read_text())


@functools.cache
def reference(name: str, tmp: str) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """The uninterrupted run (computed once per test session)."""
    deterministic()
    return RUNNERS[name](ckpt=tmp) if name.startswith("search") else RUNNERS[name]()
