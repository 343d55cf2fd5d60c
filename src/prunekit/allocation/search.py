"""An Optuna study over per-layer levels, schedule and distillation, measured not predicted.

Each trial samples one level per layer, the cubic schedule's length and the distillation
weight, prunes a copy of the model gradually while fine-tuning it (Zhu & Gupta 2017; Hinton et
al. 2015), then *measures* accuracy, latency and sparsity. The sampler is TPE (Bergstra et al.
2011, "Algorithms for hyper-parameter optimization"; Ozaki et al. 2022 for its multi-objective
and constrained forms).

The study lives in an RDB storage: a local SQLite file by default, or a PostgreSQL URL that
several worker processes or machines share. The trial budget counts finished trials across
all workers, so a resumed or shared study never runs more than it was asked for (plus at most
one in-flight trial per extra worker). Trials of a worker that died are marked failed (at once
for a dead process on this machine, after the heartbeat grace period for other machines), and
are not counted; finished trials are never re-run.
"""

from __future__ import annotations

import copy
import importlib.util
import itertools
import logging
import os
import random
import socket
import time
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
from pydantic import Field, model_validator
from torch import nn

from prunekit._moved import moved_name
from prunekit.config import FrozenConfig, MaskConfig, PerLayer, recipe_type
from prunekit.core.masks import finalize, sparsity
from prunekit.core.targets import resolve
from prunekit.core.tracking import Tracker, track
from prunekit.errors import ConfigError, SearchError
from prunekit.measure.bench import measure_latency
from prunekit.storage.runstate import loader_generators
from prunekit.train.distill import KDLoss, finetune
from prunekit.train.schedule import Cubic, GradualPruner

log = logging.getLogger(__name__)

Objective = Literal["accuracy", "latency_ms", "sparsity"]
_DIRECTIONS = {"accuracy": "maximize", "latency_ms": "minimize", "sparsity": "maximize"}


@recipe_type
class SearchConfig(FrozenConfig):
    """What a search varies, what it measures, and its budget.

    Args:
        trials: finished trials wanted in the study, across all workers and resumptions.
        levels: the per-layer levels each trial chooses from (0 leaves a layer dense).
        schedule_end: range of the cubic schedule's end, as a share of the fine-tuning steps.
        alpha: range of the distillation weight (0 = plain cross-entropy).
        temperature: distillation temperature (fixed).
        finetune_steps: fine-tuning batches per trial (the schedule prunes during them).
        lr: Adam learning rate of the fine-tuning.
        objectives: measured values the study optimises (accuracy and sparsity up, latency down).
        min_sparsity: trials below this measured parameter sparsity are infeasible (a TPE
            constraint, so the sampler learns to avoid them).
        latency_repeats: timed forwards per trial on the example inputs (median reported).
        study_name: the study's name in the storage; workers sharing a study use the same name.
        seed: sampler seed (mixed with the worker's process id, so workers explore apart).
        reproducible: instead, seed the sampler and each trial's training (torch, Python and
            numpy RNGs, the loader's generator) from `seed` and the number of finished
            trials, so one worker killed and resumed runs exactly the trials an uninterrupted
            study would (bit-identical on CPU when the objectives are deterministic: accuracy
            and sparsity, not latency). Leave it off for several workers sharing a study:
            they would sample alike.
    """

    trials: int = Field(default=20, ge=1)
    levels: tuple[float, ...] = (0.0, 0.5, 0.7, 0.8, 0.9, 0.95)
    schedule_end: tuple[float, float] = (0.2, 0.8)
    alpha: tuple[float, float] = (0.0, 0.9)
    temperature: float = Field(default=4.0, gt=0)
    finetune_steps: int = Field(default=200, ge=1)
    lr: float = Field(default=1e-3, gt=0)
    objectives: tuple[Objective, ...] = ("accuracy", "latency_ms")
    min_sparsity: float | None = Field(default=None, ge=0, lt=1)
    latency_repeats: int = Field(default=20, ge=1)
    study_name: str = "prunekit"
    seed: int = 0
    reproducible: bool = False

    @model_validator(mode="after")
    def _ranges(self) -> SearchConfig:
        if not self.levels or any(not 0 <= lv < 1 for lv in self.levels):
            raise ValueError(f"levels must be a non-empty list in [0, 1), got {self.levels}")
        if not 0 < self.schedule_end[0] <= self.schedule_end[1] <= 1:
            raise ValueError(f"schedule_end must be 0 < low <= high <= 1, got {self.schedule_end}")
        if not 0 <= self.alpha[0] <= self.alpha[1] <= 1:
            raise ValueError(f"alpha must be 0 <= low <= high <= 1, got {self.alpha}")
        if not self.objectives or len(set(self.objectives)) != len(self.objectives):
            raise ValueError(f"objectives must be distinct and non-empty, got {self.objectives}")
        return self


@dataclass(frozen=True)
class SearchResult:
    """The study after this worker finished: its best (Pareto-optimal) trials, measured."""

    study_name: str
    storage: str
    objectives: tuple[str, ...]
    n_complete: int
    best: list[dict[str, Any]]

    def best_config(self, family: FrozenConfig) -> PerLayer:
        """`PerLayer` rules (a new config) of the best trial by the first objective (among the Pareto
        front): `family.with_level(level).as_layer_rule()` per pruned layer, None for dense ones."""
        if not self.best:
            raise SearchError(f"study {self.study_name!r} has no finished trial yet")
        sign = 1 if _DIRECTIONS[self.objectives[0]] == "maximize" else -1
        top = max(self.best, key=lambda t: sign * t["values"][0])
        return PerLayer({u: family.with_level(lv).as_layer_rule() if lv > 0 else None
                         for u, lv in top["levels"].items()})

    def summary(self) -> str:
        """The Pareto front, one trial per line, with the measured values and the choices."""
        rows = [f"study {self.study_name!r} in {self.storage}: {self.n_complete} finished trials; best:"]
        for t in self.best:
            values = ", ".join(f"{k} {v:.4g}" for k, v in zip(self.objectives, t["values"], strict=True))
            rows.append(f"  #{t['number']}: {values}; alpha {t['alpha']:.2f}, schedule_end "
                        f"{t['schedule_end']:.2f}, levels {t['levels']}")
        return "\n".join(rows)

    def __str__(self) -> str:
        return self.summary()


def _optuna() -> Any:
    try:
        import optuna
    except ImportError:
        raise SearchError("prunekit.search needs optuna: pip install 'prunekit[search]'") from None
    return optuna


def _redact(url: str) -> str:
    try:
        from sqlalchemy.engine import make_url

        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # not a URL sqlalchemy parses: say nothing more than its scheme
        return url.split("://", 1)[0] + "://..."


def open_storage(url: str, *, heartbeat_interval: int = 10, grace_period: int = 60) -> Any:
    """Open (and create the tables of) an Optuna RDB storage; fail loudly if it is unreachable.

    A worker heartbeat is recorded every `heartbeat_interval` seconds while a trial runs, so a
    trial whose worker died is marked failed `grace_period` seconds later by any other worker.
    There is deliberately no fallback to a local file: workers would silently stop sharing.
    """
    optuna = _optuna()
    if "://" not in url:
        raise SearchError(f"storage {url!r} is not a database URL (sqlite:///file.db or postgresql://...)")
    url = _with_driver(url)
    engine = None if url.startswith("sqlite") else {"pool_pre_ping": True}
    from sqlalchemy.exc import IntegrityError, ProgrammingError

    for attempt in range(5):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)  # heartbeats
                return optuna.storages.RDBStorage(url, engine_kwargs=engine, heartbeat_interval=heartbeat_interval,
                                                  grace_period=grace_period)
        except (IntegrityError, ProgrammingError):
            # Workers starting together on an empty database race to create the tables; the
            # loser sees a duplicate-key error. The tables exist now: try again.
            time.sleep(0.2 * (attempt + 1))
        except Exception as err:  # sqlalchemy/driver errors vary by back end; all mean "cannot use it"
            reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise SearchError(f"cannot open the study storage {_redact(url)}: {reason}. "
                              "Not falling back to a local file; fix the URL or start the server") from None
    raise SearchError(f"cannot create the study tables in {_redact(url)}: other workers keep racing; retry")


def _with_driver(url: str) -> str:
    """Name an installed PostgreSQL driver in a bare postgresql:// URL (psycopg 3, else psycopg2).

    SQLAlchemy's default driver for "postgresql://" changed from psycopg2 (2.0) to psycopg (2.1);
    picking the one that is installed makes either work.
    """
    scheme, sep, rest = url.partition("://")
    if scheme not in ("postgresql", "postgres"):
        return url
    for module, driver in (("psycopg", "psycopg"), ("psycopg2", "psycopg2")):
        if importlib.util.find_spec(module) is not None:
            return f"postgresql+{driver}{sep}{rest}"
    raise SearchError("a PostgreSQL study needs a driver: pip install 'prunekit[search]' (psycopg)")


def _fail_dead_local_trials(storage: Any, study: Any) -> int:
    """Mark RUNNING trials whose worker process on this host is gone as FAIL (resumption)."""
    optuna = _optuna()
    host, failed = socket.gethostname(), 0
    for trial in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        worker = trial.user_attrs.get("worker", "")
        name, _, pid = worker.rpartition(":")
        if name == host and pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid)):
            storage.set_trial_state_values(trial._trial_id, optuna.trial.TrialState.FAIL)
            log.warning("search: trial %d of dead worker %s marked failed", trial.number, worker)
            failed += 1
    return failed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _trial_model(
    base: nn.Module, family: MaskConfig, levels: dict[str, float], config: SearchConfig, end: float, alpha: float,
    train: Iterable[Any],
) -> nn.Module:
    """Prune a copy of `base` gradually to `levels` while fine-tuning it; returns it finalized."""
    model = copy.deepcopy(base)
    rules = {u: family.with_level(lv).as_layer_rule() for u, lv in levels.items() if lv > 0}
    steps = config.finetune_steps
    pruner = None
    if rules:
        schedule = Cubic(start_step=0, end_step=max(1, round(end * steps)), every=max(1, steps // 20))
        pruner = GradualPruner(model, PerLayer(rules), schedule)
    batches = itertools.islice(itertools.cycle(train), steps)
    finetune(model, batches, lr=config.lr, teacher=base if alpha > 0 else None,
             kd=KDLoss(config.temperature, alpha), pruner=pruner, progress=False)
    return finalize(model)


def search(
    model: nn.Module,
    family: MaskConfig,
    train: Iterable[Any],
    evaluate: Callable[[nn.Module], float],
    example_inputs: Any,
    config: SearchConfig | None = None,
    *,
    storage: str | None = None,
    tracker: Tracker | None = None,
) -> SearchResult:
    """Run this worker's share of an Optuna study on `model` (not mutated; trials prune copies).

    Args:
        model: the trained dense model (also the distillation teacher).
        family: the mask config each layer's level is applied with (e.g. `UnstructuredConfig`).
        train: fine-tuning batches `(x, y)`, cycled as needed.
        evaluate: model -> accuracy (higher is better), e.g. `lambda m: accuracy(m, val)`.
        example_inputs: inputs on which latency is measured (batch 1 for serving latency).
        config: the search space and budget.
        storage: an Optuna RDB URL; default "sqlite:///prunekit-search.db" in the working
            directory. Give the same PostgreSQL URL and study name to several workers to share.
        tracker: a `prunekit.core.tracking.Tracker`: each trial this worker runs logs
            "search/accuracy", "search/latency_ms", "search/sparsity" (measured), "search/alpha"
            and "search/schedule_end" at step = the trial's number.

    Returns:
        A `SearchResult` with the study's Pareto-optimal trials.

    Raises:
        SearchError: optuna is missing or the storage cannot be reached (no local fallback).

    Example:
        >>> result = search(model, UnstructuredConfig(sparsity=0.5), train, evaluate, x[:1],
        ...                 SearchConfig(trials=20), storage="postgresql://u:p@db/optuna")  # doctest: +SKIP
    """
    optuna = _optuna()
    config = config or SearchConfig()
    if not isinstance(family, MaskConfig):
        raise ConfigError(f"search: family must be a mask config (with a sparsity), got {type(family).__name__}")
    url = storage or "sqlite:///prunekit-search.db"
    rdb = open_storage(url)
    states = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
    native = hasattr(optuna.trial.Trial, "set_constraint")  # optuna >= 5; constraints_func before
    constraints = None
    if config.min_sparsity is not None and not native:
        constraints = lambda t: (t.user_attrs.get("constraint", 1.0),)  # noqa: E731

    def sampler(salt: int) -> Any:
        seed = (config.seed * 1_000_003 + salt) % 2**32
        return optuna.samplers.TPESampler(seed=seed, constraints_func=constraints, n_startup_trials=5)

    study = optuna.create_study(storage=rdb, study_name=config.study_name, sampler=sampler(os.getpid()),
                                load_if_exists=True, directions=[_DIRECTIONS[o] for o in config.objectives])
    _fail_dead_local_trials(rdb, study)
    finished = {"n": len(study.get_trials(deepcopy=False, states=states))}

    def reseed(study: Any, _trial: Any = None) -> None:
        # A fresh sampler per trial, seeded by how many trials are finished: a resumed worker
        # then draws what the uninterrupted one drew, whatever its process id or history.
        finished["n"] = len(study.get_trials(deepcopy=False, states=states))
        study.sampler = sampler(finished["n"])

    if config.reproducible:
        reseed(study)
    units = list(resolve(model, family))
    worker = f"{socket.gethostname()}:{os.getpid()}"

    def objective(trial: Any) -> tuple[float, ...]:
        trial.set_user_attr("worker", worker)
        levels = {u: trial.suggest_categorical(f"level/{u}", list(config.levels)) for u in units}
        end = trial.suggest_float("schedule_end", *config.schedule_end)
        alpha = trial.suggest_float("alpha", *config.alpha)
        if config.reproducible:
            _seed_everything((config.seed * 1_000_003 + finished["n"]) % 2**32, train)
        pruned = _trial_model(model, family, levels, config, end, alpha, train)
        measured = {
            "accuracy": float(evaluate(pruned)),
            "latency_ms": measure_latency({"m": pruned}, example_inputs, repeats=config.latency_repeats,
                                          warmup=2)["m"].latency_ms_p50,
            "sparsity": float(sparsity(pruned).total),
        }
        for key, value in measured.items():
            trial.set_user_attr(key, value)
        track(tracker, {**{f"search/{k}": v for k, v in measured.items()}, "search/alpha": alpha,
                        "search/schedule_end": end}, trial.number)
        if config.min_sparsity is not None:
            violation = config.min_sparsity - measured["sparsity"]  # <= 0 is feasible
            trial.set_user_attr("constraint", violation)
            if native:
                trial.set_constraint("min_sparsity", violation)
        return tuple(measured[o] for o in config.objectives)

    done = len(study.get_trials(deepcopy=False, states=states))
    if done < config.trials:
        callbacks = [optuna.study.MaxTrialsCallback(config.trials, states=states)]
        callbacks += [reseed] if config.reproducible else []
        study.optimize(objective, n_trials=config.trials - done, callbacks=callbacks, gc_after_trial=False)
    return _result(study, config, url, states)


def _seed_everything(seed: int, train: Iterable[Any]) -> None:
    """Seed torch, Python and numpy and the loader's own generators (a reproducible trial)."""
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed)
    for gen in loader_generators(train):
        gen.manual_seed(seed)


def _result(study: Any, config: SearchConfig, url: str, states: tuple[Any, ...]) -> SearchResult:
    best = []
    for t in study.best_trials:
        levels = {k.removeprefix("level/"): v for k, v in t.params.items() if k.startswith("level/")}
        best.append({"number": t.number, "values": list(t.values), "levels": levels,
                     "alpha": t.params["alpha"], "schedule_end": t.params["schedule_end"],
                     "measured": {k: t.user_attrs.get(k) for k in _DIRECTIONS}})
    n_complete = len(study.get_trials(deepcopy=False, states=states))
    return SearchResult(config.study_name, _redact(url), tuple(config.objectives), n_complete, best)


# --------------------------------------------------------------------------------------------
# Recipes: the `prunekit search` command's YAML.


@recipe_type
class SearchRecipe(FrozenConfig):
    """A search as a YAML document: model and data entry points, the config family, the space.

    Example recipe (YAML):

        _type: SearchRecipe
        model: mypkg.models:trained_model     # returns the trained nn.Module
        data: mypkg.data:loaders              # returns (train_loader, eval_loader)
        prune: {_type: UnstructuredConfig, sparsity: 0.9}
        search: {_type: SearchConfig, trials: 30, min_sparsity: 0.85}
        input_shape: [1, 1, 28, 28]           # latency is measured on zeros of this shape
        storage: postgresql://user:pass@db-host/optuna   # optional; SQLite file otherwise
    """

    model: str
    data: str
    checkpoint: str | None = None
    prune: FrozenConfig
    search: SearchConfig = SearchConfig()
    input_shape: tuple[int, ...] = (1, 1, 28, 28)
    storage: str | None = None


def __getattr__(name: str) -> Any:  # run_search_recipe moved to prunekit.recipes.search (warns)
    return moved_name(__name__, name)
