"""Experiment tracking (optional): per-step loss, sparsity and metrics to TensorBoard or MLflow.

The loops that run for a while take a `tracker=`: `finetune` (loss, learning rate and the
pruner's sparsity per optimizer step, the mean loss per epoch), `recover` (loss, learning rate,
tokens per step), `GradualPruner` (the schedule's sparsity per step), `sensitivity` (each unit's
metric per level) and `search` (each trial's measured objectives). `log_report_headline` logs
the headline numbers of a validation report (accuracy or perplexity, sparsity, size and speed-up
ratios). A tracker is anything with the three methods of `Tracker`; two come built in, each an
optional extra: `TensorBoardTracker` (`pip install 'prunekit[tensorboard]'`) and
`MLflowTracker` (`pip install 'prunekit[mlflow]'`, a local SQLite store by default).

Under torchrun the loops log from rank 0 only, and the built-in trackers open their event file
or run on their first write and never write on other ranks, so one tracker built the same way
on every rank gives one record.

Example:
    >>> tracker = tracker_from_spec("tensorboard:runs/prune-90")  # doctest: +SKIP
    >>> finetune(model, loader, pruner=pruner, tracker=tracker)  # doctest: +SKIP
    >>> log_report_headline(tracker, compare(dense, model, val).data)  # doctest: +SKIP
    >>> tracker.close()  # doctest: +SKIP
"""

from __future__ import annotations

import json
import math
import re
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from prunekit.core.distributed import is_main_rank
from prunekit.core.extras import require
from prunekit.errors import ConfigError

__all__ = [
    "MLflowTracker",
    "TensorBoardTracker",
    "Tracker",
    "log_report_headline",
    "report_headline",
    "track",
    "tracker_from_spec",
]

_MLFLOW_BATCH = 1000  # MLflow's limit of metrics per log_batch call
_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]+:")  # a URI scheme of two or more characters


@runtime_checkable
class Tracker(Protocol):
    """What the loops log to: metrics at an integer step, parameters once, and `close`."""

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        """Record each named value at `step` (an optimizer step, trial number or level)."""

    def log_params(self, params: Mapping[str, object]) -> None:
        """Record the run's settings (written once; values are shown as text)."""

    def close(self) -> None:
        """Flush and release the writer; later calls may reopen it."""


def track(tracker: Tracker | None, metrics: Mapping[str, float | None], step: int) -> None:
    """Log `metrics` (None values left out) at `step` to `tracker`, on the main rank only; no-op without one."""
    if tracker is None or not is_main_rank():
        return
    values = {k: float(v) for k, v in metrics.items() if v is not None}
    if values:
        tracker.log_metrics(values, int(step))


def _param_text(value: object) -> str:
    if isinstance(value, str):
        return value
    try:
        return json.dumps(value, default=str)
    except (TypeError, ValueError):  # a circular structure: its repr says enough
        return repr(value)


class TensorBoardTracker:
    """Scalars (and parameters as text) in a TensorBoard event file under `log_dir`.

    Args:
        log_dir: the run's folder (created on the first write); point `tensorboard --logdir`
            at it or at its parent.
        flush_secs: how often the writer flushes to disk while the run goes on.

    Raises:
        PrunekitError: tensorboard is not installed (names the extra to install).
    """

    def __init__(self, log_dir: str | Path, *, flush_secs: int = 10) -> None:
        require("tensorboard", extra="tensorboard", what="TensorBoard tracking")
        self.log_dir, self.flush_secs = Path(log_dir), flush_secs
        self._writer: Any = None

    def _open(self) -> Any:
        if self._writer is None:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(log_dir=str(self.log_dir), flush_secs=self.flush_secs)
        return self._writer

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        """Add each value as the scalar `name` at `step` (rank 0 only; does not flush)."""
        if not is_main_rank():
            return
        writer = self._open()
        for name, value in metrics.items():
            writer.add_scalar(name, float(value), global_step=int(step))

    def log_params(self, params: Mapping[str, object]) -> None:
        """Add each setting as the text `params/<name>` (rank 0 only)."""
        if not is_main_rank():
            return
        writer = self._open()
        for name, value in params.items():
            writer.add_text(f"params/{name}", _param_text(value))

    def close(self) -> None:
        """Flush the event file and close the writer (a later log opens a new file)."""
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def __enter__(self) -> TensorBoardTracker:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class MLflowTracker:
    """Metrics and parameters of one MLflow run, in a tracking store (SQLite by default).

    The run is created on the first write, so building the tracker costs nothing until then.

    Args:
        tracking_uri: the store: "sqlite:///mlflow.db" (a file in the working directory), another
            database URL, or a tracking server "http://host:5000". MLflow refuses a plain folder
            unless MLFLOW_ALLOW_FILE_STORE is set; a URI without a scheme is refused here.
        experiment: the experiment's name (created if missing).
        run_name: the run's name (MLflow picks one if None).

    Raises:
        ConfigError: `tracking_uri` has no scheme (e.g. a bare path).
        PrunekitError: mlflow is not installed (names the extra to install).
    """

    def __init__(self, tracking_uri: str = "sqlite:///mlflow.db", experiment: str = "prunekit",
                 run_name: str | None = None) -> None:
        if not _SCHEME.match(tracking_uri):
            raise ConfigError(f"MLflowTracker: tracking_uri {tracking_uri!r} is not a URI; use e.g. "
                              "'sqlite:///mlflow.db' or 'http://host:5000'")
        if not experiment:
            raise ConfigError("MLflowTracker: experiment must be a non-empty name")
        require("mlflow", extra="mlflow", what="MLflow tracking")
        self.tracking_uri, self.experiment, self.run_name = tracking_uri, experiment, run_name
        self.run_id: str | None = None
        self._client: Any = None

    def _open(self) -> tuple[Any, str]:
        if self._client is None or self.run_id is None:
            from mlflow.tracking import MlflowClient

            client = MlflowClient(tracking_uri=self.tracking_uri)
            found = client.get_experiment_by_name(self.experiment)
            exp_id = found.experiment_id if found is not None else client.create_experiment(self.experiment)
            self.run_id = client.create_run(exp_id, run_name=self.run_name).info.run_id
            self._client = client
        return self._client, self.run_id

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        """Add each value to the run's history of metric `name` at `step` (rank 0 only)."""
        if not is_main_rank() or not metrics:
            return
        from mlflow.entities import Metric

        client, run_id = self._open()
        now = int(time.time() * 1000)
        rows = [Metric(_mlflow_key(k), float(v), now, int(step)) for k, v in metrics.items()]
        for i in range(0, len(rows), _MLFLOW_BATCH):
            client.log_batch(run_id, metrics=rows[i : i + _MLFLOW_BATCH])

    def log_params(self, params: Mapping[str, object]) -> None:
        """Set the run's parameters (rank 0 only); MLflow refuses to change one already set."""
        if not is_main_rank() or not params:
            return
        from mlflow.entities import Param

        client, run_id = self._open()
        client.log_batch(run_id, params=[Param(_mlflow_key(k), _param_text(v)) for k, v in params.items()])

    def close(self) -> None:
        """Mark the run finished (a later log starts a new run)."""
        if self._client is not None and self.run_id is not None:
            self._client.set_terminated(self.run_id)
        self._client, self.run_id = None, None

    def __enter__(self) -> MLflowTracker:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _mlflow_key(name: str) -> str:
    """`name` with characters MLflow refuses in keys (all but letters, digits, `_-. /:`) as `_`."""
    return re.sub(r"[^A-Za-z0-9_\-. /:]", "_", name)


def tracker_from_spec(spec: str) -> Tracker:
    """A tracker from a one-line spec (for the CLI and recipes); opens nothing yet.

    "tensorboard:DIR" is a `TensorBoardTracker` writing under DIR; "mlflow:URI" an
    `MLflowTracker` on that store ("mlflow:" alone: sqlite:///mlflow.db), with an optional
    "#experiment" at the end, e.g. "mlflow:sqlite:///runs/mlflow.db#resnet-prune".

    Raises:
        ConfigError: an unknown back end or an empty folder (the message shows the forms).
        PrunekitError: the back end's package is not installed (names the extra).
    """
    forms = "'tensorboard:runs/NAME' or 'mlflow:sqlite:///mlflow.db[#experiment]'"
    backend, sep, rest = spec.partition(":")
    if backend == "tensorboard" and sep and rest.strip():
        return TensorBoardTracker(rest.strip())
    if backend == "mlflow" and sep:
        uri, _, experiment = rest.strip().partition("#")
        return MLflowTracker(uri or "sqlite:///mlflow.db", experiment or "prunekit")
    raise ConfigError(f"tracker spec {spec!r}: expected {forms}")


def report_headline(report: Any) -> dict[str, float]:
    """The headline numbers of a validation report (its `data`, or a loaded report.json): plain floats.

    Classification (`compare`): accuracy baseline/pruned/delta, sparsity, disk size, non-zero
    parameter and FLOPs ratios (baseline / pruned) and the p50 speed-up per batch size. Language
    model (`compare_lm`): perplexity baseline/pruned/ratio and the prefill and decode speed-ups.
    Numbers a report lacks are left out.

    Raises:
        ConfigError: `report` has no baseline and pruned sections (not a prunekit report).
    """
    data = getattr(report, "data", report)
    base, pruned = (data.get(k) if isinstance(data, Mapping) else None for k in ("baseline", "pruned"))
    if not isinstance(base, Mapping) or not isinstance(pruned, Mapping):
        raise ConfigError("log_report_headline: expected a report's data with 'baseline' and 'pruned' sections "
                          "(Report.data or a loaded report.json)")
    out: dict[str, float | None] = {"sparsity": pruned.get("sparsity")}
    if "accuracy" in base and "accuracy" in pruned:
        out.update(accuracy_baseline=base["accuracy"], accuracy_pruned=pruned["accuracy"],
                   accuracy_delta=pruned["accuracy"] - base["accuracy"])
    for key, name in (("size_bytes", "size_ratio"), ("nonzero_params", "nonzero_params_ratio"),
                      ("flops", "flops_ratio")):
        out[name] = _ratio(base.get(key), pruned.get(key))
    out["size_bytes_pruned"] = pruned.get("size_bytes")
    for row in data.get("latency", {}).get("by_batch", []):
        out[f"speedup_batch{row['batch_size']}"] = row.get("speedup")
    ppl = data.get("perplexity")
    if isinstance(ppl, Mapping):
        out.update(perplexity_baseline=ppl.get("baseline"), perplexity_pruned=ppl.get("pruned"),
                   perplexity_ratio=_ratio(ppl.get("pruned"), ppl.get("baseline")))
    speed = data.get("speed")
    if isinstance(speed, Mapping):
        b, p = speed.get("baseline", {}), speed.get("pruned", {})
        out["prefill_speedup"] = _ratio(b.get("prefill_ms"), p.get("prefill_ms"))
        out["decode_speedup"] = _ratio(b.get("decode_ms_per_token"), p.get("decode_ms_per_token"))
    return {k: float(v) for k, v in out.items() if v is not None and math.isfinite(float(v))}


def _ratio(num: Any, den: Any) -> float | None:
    if num is None or den is None or not den:
        return None
    return float(num) / float(den)


def log_report_headline(tracker: Tracker | None, report: Any, step: int = 0,
                        prefix: str = "report/") -> dict[str, float]:
    """Log `report_headline(report)` as `prefix + name` at `step` (main rank only); returns the numbers.

    Raises:
        ConfigError: `report` is not a prunekit report's data.
    """
    headline = report_headline(report)
    track(tracker, {prefix + k: v for k, v in headline.items()}, step)
    return headline
