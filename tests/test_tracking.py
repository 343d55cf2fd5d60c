"""Experiment tracking: real TensorBoard event files and a real MLflow SQLite store, read back;
the loops log what they did (sparsity after each step, each step's loss, each scan cell)."""

from __future__ import annotations

import copy
import sys
from collections.abc import Mapping
from pathlib import Path

import pytest
import torch
from torch import nn

import prunekit as pk
from prunekit.allocation.search import SearchConfig, search
from prunekit.allocation.sensitivity import proxy_loss, sensitivity
from prunekit.core import tracking
from prunekit.core.tracking import (
    MLflowTracker,
    TensorBoardTracker,
    Tracker,
    log_report_headline,
    report_headline,
    track,
    tracker_from_spec,
)
from prunekit.errors import ConfigError, PrunekitError
from prunekit.train.distill import KDLoss, finetune

pytest.importorskip("tensorboard")
pytest.importorskip("mlflow")
from mlflow.tracking import MlflowClient  # noqa: E402
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402

# mlflow 3.17's SQLAlchemy store uses a loader strategy SQLAlchemy 2.1 deprecates
pytestmark = [pytest.mark.filterwarnings("ignore:The ``noload`` loader strategy:DeprecationWarning"),
              pytest.mark.usefixtures("one_thread")]  # one_thread: tests/conftest.py


@pytest.fixture(scope="module")
def mlflow_uri(tmp_path_factory: pytest.TempPathFactory) -> str:
    """One SQLite store for the module (creating its tables is most of an MLflow test's time)."""
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"



class Recorder:
    """A plain `Tracker` that keeps every call, and forwards to another tracker if given."""

    def __init__(self, inner: Tracker | None = None, on_log=None) -> None:  # noqa: ANN001
        self.metrics: dict[str, dict[int, float]] = {}
        self.inner, self.on_log, self.closed = inner, on_log, False

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        for k, v in metrics.items():
            assert step not in self.metrics.get(k, {}), f"{k} logged twice at step {step}"
            self.metrics.setdefault(k, {})[step] = v
        if self.on_log is not None:
            self.on_log(metrics, step)
        if self.inner is not None:
            self.inner.log_metrics(metrics, step)

    def log_params(self, params: Mapping[str, object]) -> None:
        if self.inner is not None:
            self.inner.log_params(params)

    def close(self) -> None:
        self.closed = True
        if self.inner is not None:
            self.inner.close()


def scalars(log_dir: Path, tag: str) -> dict[int, float]:
    events = EventAccumulator(str(log_dir), size_guidance={"scalars": 0, "tensors": 0})
    events.Reload()
    return {e.step: e.value for e in events.Scalars(tag)}


def mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 4))


def batches(n: int = 8) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(4, 8, generator=g), torch.randint(0, 4, (4,), generator=g)) for _ in range(n)]


def test_tensorboard_event_file_reads_back(tmp_path: Path) -> None:
    with TensorBoardTracker(tmp_path / "tb") as tb:
        assert isinstance(tb, Tracker) and not (tmp_path / "tb").exists()  # nothing opened before a write
        for step in range(3):
            tb.log_metrics({"loss": 1.0 / (step + 1), "a/b": float(step)}, step)
        tb.log_params({"lr": 0.01, "levels": [0.5, 0.9]})
    assert scalars(tmp_path / "tb", "loss") == pytest.approx({0: 1.0, 1: 0.5, 2: 1 / 3})
    assert scalars(tmp_path / "tb", "a/b") == {0: 0.0, 1: 1.0, 2: 2.0}
    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    text = events.Tensors("params/levels/text_summary")[0].tensor_proto.string_val[0]
    assert text == b"[0.5, 0.9]"


def test_mlflow_sqlite_store_reads_back(mlflow_uri: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    uri = mlflow_uri
    ml = MLflowTracker(uri, experiment="unit", run_name="r1")
    ml.log_metrics({"loss": 2.0, "layer[0]": 0.5}, 0)
    ml.log_metrics({"loss": 1.5}, 1)
    ml.log_params({"lr": 0.01, "family": {"_type": "UnstructuredConfig"}})
    run_id = ml.run_id
    ml.close()
    client = MlflowClient(tracking_uri=uri)
    assert [(m.step, m.value) for m in client.get_metric_history(run_id, "loss")] == [(0, 2.0), (1, 1.5)]
    assert [m.value for m in client.get_metric_history(run_id, "layer_0_")] == [0.5]  # key made MLflow-safe
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "r1"
    assert run.data.params == {"lr": "0.01", "family": '{"_type": "UnstructuredConfig"}'}
    assert client.get_experiment(run.info.experiment_id).name == "unit"


def test_finetune_with_gradual_pruner_logs_what_the_loop_did(tmp_path: Path) -> None:
    model, teacher = mlp(0), mlp(1)
    schedule = pk.Cubic(start_step=0, end_step=4, every=1)
    measured: dict[int, float] = {}

    def on_log(metrics: Mapping[str, float], step: int) -> None:  # the masks as they are when logged
        if "prune/sparsity" in metrics:
            measured[step] = pk.sparsity(model).total

    pruner_log = Recorder(on_log=on_log)
    pruner = pk.GradualPruner(model, pk.UnstructuredConfig(sparsity=0.75, scope="layer"), schedule, tracker=pruner_log)
    losses: list[float] = []

    class Recording(KDLoss):
        def forward(self, s: torch.Tensor, t: torch.Tensor | None, y: torch.Tensor) -> torch.Tensor:
            loss = super().forward(s, t, y)
            losses.append(loss.item())
            return loss

    epochs: list[float] = []
    tb = TensorBoardTracker(tmp_path / "tb")
    loop_log = Recorder(tb)
    last = finetune(model, batches(7), epochs=1, teacher=teacher, kd=Recording(alpha=0.5), pruner=pruner,
                    accumulation=2, progress=False, lr=0.01, tracker=loop_log,
                    callback=lambda e, s, mean: epochs.append(mean))
    tb.close()
    assert last == 4  # 7 batches, 2 per step: 3 full steps and a short one
    assert sorted(pruner_log.metrics["prune/sparsity"]) == [1, 2, 3, 4]
    for step, value in pruner_log.metrics["prune/sparsity"].items():
        assert value == pytest.approx(schedule.sparsity_at(step, 0.75))
        assert measured[step] == pytest.approx(value, abs=0.01)  # what the masks really held
    expected = {1: (losses[0] + losses[1]) / 2, 2: (losses[2] + losses[3]) / 2, 3: (losses[4] + losses[5]) / 2,
                4: losses[6]}
    assert loop_log.metrics["finetune/loss"] == pytest.approx(expected)
    assert loop_log.metrics["finetune/sparsity"] == pytest.approx(pruner_log.metrics["prune/sparsity"])
    assert loop_log.metrics["finetune/lr"] == pytest.approx({s: 0.01 for s in range(1, 5)})
    assert loop_log.metrics["finetune/epoch_loss"] == pytest.approx({4: epochs[0]})
    # the same numbers, read back from the event file
    assert scalars(tmp_path / "tb", "finetune/loss") == pytest.approx(expected)
    assert scalars(tmp_path / "tb", "finetune/sparsity") == pytest.approx(pruner_log.metrics["prune/sparsity"])


def test_recovery_logs_its_history() -> None:
    transformers = pytest.importorskip("transformers")
    from prunekit.train.recovery import Recovery, RecoveryConfig

    torch.manual_seed(0)
    teacher = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=128, max_position_embeddings=32)).eval()
    student = pk.prune(copy.deepcopy(teacher), pk.NMConfig(n=2, m=4, exclude=["lm_head"]))
    g = torch.Generator().manual_seed(1)
    ids = [torch.randint(0, 128, (2, 8), generator=g) for _ in range(3)]
    run = Recovery(student, teacher, ids, RecoveryConfig(tokens=16 * 3, lr=1e-3))
    log = Recorder()
    run.run(progress=False, tracker=log)
    assert log.metrics["recovery/loss"] == {r.step: r.loss for r in run.history}
    assert log.metrics["recovery/tokens"] == {r.step: r.tokens for r in run.history}
    assert log.metrics["recovery/lr"] == pytest.approx({r.step: r.lr for r in run.history})
    assert "recovery/sparsity" not in log.metrics  # no pruner


def test_sensitivity_scan_logs_every_cell_to_mlflow(mlflow_uri: str, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    model = mlp()
    data = batches(2)
    evaluate = proxy_loss(data, n_batches=2)
    uri = mlflow_uri
    ml = MLflowTracker(uri, experiment="scan")
    table = sensitivity(model, pk.UnstructuredConfig(sparsity=0.5), evaluate, levels=[0.5, 0.9],
                        higher_is_better=False, tracker=ml)
    ml_run = ml.run_id
    ml.close()
    client = MlflowClient(tracking_uri=uri)
    (run,) = client.search_runs([client.get_experiment_by_name("scan").experiment_id])
    assert run.info.run_id == ml_run and len(table.units) == 2
    for unit in table.units:
        history = client.get_metric_history(ml_run, f"sensitivity/{unit}")
        assert {m.step: m.value for m in history} == pytest.approx(dict(zip([50, 90], table.values[unit], strict=True)))
    baseline = client.get_metric_history(ml_run, "sensitivity.baseline")
    assert [m.value for m in baseline] == pytest.approx([table.baseline])


def test_search_logs_each_trial(tmp_path: Path) -> None:
    pytest.importorskip("optuna")
    data = batches(4)
    log = Recorder()
    url = f"sqlite:///{tmp_path / 'study.db'}"
    search(mlp(), pk.UnstructuredConfig(sparsity=0.5), data, lambda m: pk.accuracy(m, data), torch.zeros(1, 8),
           SearchConfig(trials=2, finetune_steps=2, latency_repeats=2), storage=url, tracker=log)
    import optuna

    trials = optuna.load_study(study_name="prunekit", storage=url).get_trials()
    assert sorted(log.metrics["search/accuracy"]) == [t.number for t in trials]
    for t in trials:
        assert log.metrics["search/sparsity"][t.number] == pytest.approx(t.user_attrs["sparsity"])
        assert log.metrics["search/alpha"][t.number] == pytest.approx(t.params["alpha"])


def test_report_headline_of_a_real_compare() -> None:
    dense = mlp()
    pruned = pk.prune(mlp(), pk.UnstructuredConfig(sparsity=0.8, scope="layer"))
    report = pk.compare(dense, pruned, batches(4), batch_sizes=(1,), repeats=3, warmup=1)
    log = Recorder()
    headline = log_report_headline(log, report, step=7)
    d = report.data
    assert headline["accuracy_baseline"] == d["baseline"]["accuracy"]
    assert headline["accuracy_delta"] == pytest.approx(d["pruned"]["accuracy"] - d["baseline"]["accuracy"])
    assert headline["sparsity"] == pytest.approx(d["pruned"]["sparsity"]) and headline["sparsity"] > 0.7
    assert headline["size_ratio"] == pytest.approx(d["baseline"]["size_bytes"] / d["pruned"]["size_bytes"])
    assert headline["speedup_batch1"] == d["latency"]["by_batch"][0]["speedup"]
    assert log.metrics["report/nonzero_params_ratio"] == {7: headline["nonzero_params_ratio"]}


def test_report_headline_of_a_language_model_report() -> None:
    data = {"kind": "causal-lm", "baseline": {"size_bytes": 100}, "pruned": {"size_bytes": 50, "sparsity": 0.5},
            "perplexity": {"baseline": 20.0, "pruned": 22.0},
            "speed": {"baseline": {"prefill_ms": 30.0, "decode_ms_per_token": 10.0},
                      "pruned": {"prefill_ms": 20.0, "decode_ms_per_token": 8.0}}}
    assert report_headline(data) == pytest.approx({
        "sparsity": 0.5, "size_ratio": 2.0, "size_bytes_pruned": 50, "perplexity_baseline": 20.0,
        "perplexity_pruned": 22.0, "perplexity_ratio": 1.1, "prefill_speedup": 1.5, "decode_speedup": 1.25})
    with pytest.raises(ConfigError, match="baseline"):
        report_headline({"accuracy": 0.9})


def test_specs_and_their_errors(tmp_path: Path) -> None:
    tb = tracker_from_spec(f"tensorboard:{tmp_path / 'runs'}")
    assert isinstance(tb, TensorBoardTracker) and tb.log_dir == tmp_path / "runs"
    ml = tracker_from_spec("mlflow:sqlite:///x.db#pruning")
    assert isinstance(ml, MLflowTracker) and (ml.tracking_uri, ml.experiment) == ("sqlite:///x.db", "pruning")
    default = tracker_from_spec("mlflow:")
    assert isinstance(default, MLflowTracker) and default.tracking_uri == "sqlite:///mlflow.db"
    for bad in ("wandb:proj", "tensorboard:", "tensorboard", "runs/x", ""):
        with pytest.raises(ConfigError, match="tensorboard:runs/NAME"):
            tracker_from_spec(bad)
    with pytest.raises(ConfigError, match="not a URI"):
        tracker_from_spec("mlflow:runs/mlflow")


@pytest.mark.parametrize(("module", "make"), [("tensorboard", lambda p: TensorBoardTracker(p)),
                                              ("mlflow", lambda p: MLflowTracker())])
def test_missing_package_names_the_extra(module: str, make, tmp_path: Path,  # noqa: ANN001
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, module, None)  # `import module` now raises ImportError
    with pytest.raises(PrunekitError, match=rf"pip install 'prunekit\[{module}\]'"):
        make(tmp_path)


def test_other_ranks_log_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tracking, "is_main_rank", lambda: False)
    log = Recorder()
    track(log, {"x": 1.0}, 0)
    tb = TensorBoardTracker(tmp_path / "tb")
    tb.log_metrics({"x": 1.0}, 0)
    tb.close()
    assert log.metrics == {} and not (tmp_path / "tb").exists()
    track(None, {"x": 1.0}, 0)  # no tracker: nothing to do


def test_cli_prune_track_logs_training_and_report_headline(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from prunekit.cli import app
    from prunekit.recipes.run import FinetuneConfig, Recipe

    recipe = Recipe(model="tests.recipe_entry_points:build_model", data="tests.recipe_entry_points:loaders",
                    prune=pk.UnstructuredConfig(sparsity=0.75), schedule=pk.Cubic(end_step=4, every=2),
                    finetune=FinetuneConfig(epochs=1, lr=1e-2))
    path = pk.save_recipe(recipe, tmp_path / "r.yaml")
    result = CliRunner().invoke(app, ["prune", "--recipe", str(path), "--out", str(tmp_path / "out"),
                                      "--no-progress", "--track", f"tensorboard:{tmp_path / 'tb'}"])
    assert result.exit_code == 0, result.output
    sparsity = scalars(tmp_path / "tb", "prune/sparsity")
    assert max(sparsity.values()) == pytest.approx(0.75, abs=0.01)
    assert scalars(tmp_path / "tb", "finetune/loss")
    assert scalars(tmp_path / "tb", "report/sparsity")[0] == pytest.approx(0.75, abs=0.01)
    bad = CliRunner().invoke(app, ["prune", "--recipe", str(path), "--out", str(tmp_path / "b"), "--track", "wandb:x"])
    assert bad.exit_code != 0 and "wandb:x" in bad.output and not (tmp_path / "b" / "report.json").exists()
