"""Recipes run end to end from the CLI and fail with the culprit's name."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

import prunekit as pk
from prunekit.cli import app
from prunekit.recipes.run import FinetuneConfig, Recipe, run_recipe

EP = "tests.recipe_entry_points"


def _recipe(**kw) -> Recipe:
    fields = {"model": f"{EP}:build_model", "data": f"{EP}:loaders", "prune": pk.UnstructuredConfig(sparsity=0.75),
              "schedule": pk.Cubic(end_step=12, every=2), "finetune": FinetuneConfig(epochs=2, lr=1e-2)}
    return Recipe(**{**fields, **kw})


def test_recipe_yaml_round_trip(tmp_path) -> None:
    recipe = _recipe()
    assert pk.load_recipe(pk.save_recipe(recipe, tmp_path / "r.yaml")) == recipe


def test_cli_prune_runs_recipe(tmp_path) -> None:
    path = pk.save_recipe(_recipe(), tmp_path / "r.yaml")
    result = CliRunner().invoke(app, ["prune", "--recipe", str(path), "--out", str(tmp_path / "out"), "--no-progress"])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["pruned"]["sparsity"] == pytest.approx(0.75, abs=0.01)
    from tests.recipe_entry_points import build_model

    model = pk.load(tmp_path / "out" / "pruned.safetensors", build_model())
    assert pk.sparsity(model).total == pytest.approx(0.75, abs=0.01)


def test_structured_recipe_traces_the_first_eval_batch_and_saves_its_plan(tmp_path) -> None:
    from tests.recipe_entry_points import build_cnn, image_loaders

    recipe = _recipe(model=f"{EP}:build_cnn", data=f"{EP}:image_loaders", prune=pk.ChannelConfig(ratio=0.5),
                     schedule=None, finetune=FinetuneConfig(epochs=1, lr=1e-2))
    report = run_recipe(recipe, tmp_path, progress=False)
    assert report["pruned"]["params"] < 0.6 * report["baseline"]["params"]
    assert report["pruned"]["flops"] < report["baseline"]["flops"]
    model = pk.load(tmp_path / "pruned.safetensors", build_cnn)  # the saved plan is replayed on a dense build
    assert model[0].out_channels == 4 and model[3].out_channels == 8
    x = next(iter(image_loaders()[1]))[0]
    assert model(x).shape == (32, 3)
    # the same file exports from the command line through the model's entry point; the ONNX check passes
    result = CliRunner().invoke(app, ["export", str(tmp_path / "pruned.safetensors"), "--out", str(tmp_path / "c.onnx"),
                                      "--model", f"{EP}:build_cnn", "--input-shape", "1,1,8,8"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "c.onnx").exists()


@pytest.mark.parametrize(
    ("override", "needle"),
    [({"data": None, "prune": pk.ChannelConfig(ratio=0.5)}, "set recipe.data .* or recipe.example_inputs"),
     ({"prune": pk.UnstructuredConfig(sparsity=0.5, criterion="wanda")}, "set recipe.calibration")],
)
def test_a_missing_input_names_the_recipe_field(tmp_path, override: dict, needle: str) -> None:
    with pytest.raises(pk.ConfigError, match=needle):
        run_recipe(_recipe(schedule=None, finetune=None, **override), tmp_path, progress=False)


def test_example_inputs_the_model_rejects_name_their_shape(tmp_path) -> None:
    recipe = _recipe(model=f"{EP}:build_cnn", data=None, example_inputs=f"{EP}:wrong_example",
                     prune=pk.ChannelConfig(ratio=0.5), schedule=None, finetune=None)
    with pytest.raises(pk.TraceError, match=r"recipe.example_inputs \(shape \[1, 3, 8, 8\]\).*1 channels"):
        run_recipe(recipe, tmp_path, progress=False)


def test_export_entry_point_must_build_a_module(tmp_path) -> None:
    from prunekit.cli import export_command

    with pytest.raises(pk.ConfigError, match=r"not_a_model.*returned str"):
        export_command(tmp_path / "x.safetensors", tmp_path / "x.onnx", model=f"{EP}:not_a_model")


def test_one_shot_recipe_without_data(tmp_path) -> None:
    result = run_recipe(_recipe(data=None, schedule=None, finetune=None), tmp_path, progress=False)
    assert result["pruned"]["size_bytes"] == (tmp_path / "pruned.safetensors").stat().st_size


@pytest.mark.parametrize(
    ("override", "needle"),
    [({"model": f"{EP}:nope"}, "no callable 'nope'"), ({"model": "no_such_pkg.x:f"}, "cannot import 'no_such_pkg.x'"),
     ({"model": f"{EP}:broken"}, "raised RuntimeError: no GPU here")],
)
def test_bad_entry_points_are_named(tmp_path, override: dict, needle: str) -> None:
    with pytest.raises(pk.ConfigError, match=needle):
        run_recipe(_recipe(**override), tmp_path, progress=False)


def test_entry_point_form_is_validated(tmp_path) -> None:
    with pytest.raises(pk.ConfigError, match="Recipe.model"):
        _recipe(model="pkg:mod:fn")
    with pytest.raises(pk.ConfigError, match="Recipe.calibration"):
        _recipe(calibration=0)
    with pytest.raises(pk.ConfigError, match="neither an entry point .* nor a Hugging Face model folder"):
        run_recipe(_recipe(model="just_a_module"), tmp_path, progress=False)


def test_misspelt_recipe_key_fails_in_cli(tmp_path) -> None:
    path = tmp_path / "r.yaml"
    path.write_text(f"_type: Recipe\nmodel: {EP}:build_model\nprune: {{_type: UnstructuredConfig, sparsity: 0.5}}\n"
                    "finetun: {_type: FinetuneConfig}\n")
    result = CliRunner().invoke(app, ["prune", "--recipe", str(path), "--out", str(tmp_path / "o")])
    assert result.exit_code == 2 and "finetun" in result.output


def _run_cli(tmp_path, text: str, out: str = "out") -> tuple[int, str]:
    """`python -m prunekit prune` on a YAML recipe, in a subprocess (the real command)."""
    import subprocess
    import sys

    path = tmp_path / "r.yaml"
    path.write_text(text)
    done = subprocess.run([sys.executable, "-m", "prunekit", "prune", "--recipe", str(path), "--out",
                           str(tmp_path / out), "--no-progress"], capture_output=True, text=True, timeout=600)
    return done.returncode, done.stdout + done.stderr


def test_wanda_recipe_calibrates_on_training_batches(tmp_path) -> None:
    code, output = _run_cli(tmp_path, f"""_type: Recipe
model: {EP}:build_model
data: {EP}:loaders
calibration: 4
prune: {{_type: UnstructuredConfig, sparsity: 0.5, criterion: wanda}}
report: {{_type: ReportSettings, batch_sizes: [1], repeats: 5}}
""")
    assert code == 0, output
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["pruned"]["sparsity"] == pytest.approx(0.5, abs=0.01)
    assert report["stages_s"]["prune"] > 0 and "accuracy within 1 point" in output


def test_allocate_quantize_export_recipe(tmp_path) -> None:
    code, output = _run_cli(tmp_path, f"""_type: Recipe
model: {EP}:build_model
data: {EP}:loaders
allocate: {{_type: AllocateStage, target: {{_type: SparsityTarget, sparsity: 0.6}}, levels: [0.3, 0.6, 0.9]}}
prune: {{_type: UnstructuredConfig, sparsity: 0.5}}
finetune: {{_type: FinetuneConfig, epochs: 1, lr: 0.01}}
quantize: {{_type: DynamicInt8Config}}
export: {{_type: ExportStage, sparse_initializers: true, coreml: fp16}}
report: {{_type: ReportSettings, batch_sizes: [1], repeats: 5}}
""")
    assert code == 0, output
    out = tmp_path / "out"
    allocation = pk.load_recipe(out / "allocation.yaml")
    assert isinstance(allocation, pk.PerLayer) and len(set(allocation.rules.values())) > 1  # per-layer levels
    report = json.loads((out / "report.json").read_text())
    assert set(report["stages_s"]) >= {"allocate", "prune", "finetune", "quantize", "export", "report"}
    assert report["files"]["onnx"]["int8"] and (out / "model.onnx").stat().st_size > 0
    coreml = report["files"]["coreml"]  # the float pruned model, its sparse weights checked in the package
    assert coreml["sparse_weights_checked"] >= 1 and coreml["size_bytes"] < coreml["dense_size_bytes"]
    assert (out / "sensitivity.json").exists() and (out / "pruned.safetensors").exists()


def test_iterative_channel_recipe_saves_every_round_plan(tmp_path) -> None:
    from tests.recipe_entry_points import build_cnn, image_loaders

    recipe = _recipe(model=f"{EP}:build_cnn", data=f"{EP}:image_loaders", prune=pk.ChannelConfig(ratio=0.5),
                     schedule=pk.Iterative(steps=(0, 1)), finetune=FinetuneConfig(epochs=1, lr=1e-2))
    report = run_recipe(recipe, tmp_path, progress=False)
    assert report["pruned"]["params"] < 0.7 * report["baseline"]["params"]
    model = pk.load(tmp_path / "pruned.safetensors", build_cnn)  # both rounds' plans replayed
    x = next(iter(image_loaders()[1]))[0]
    assert model[0].out_channels < 8 and model(x).shape == (32, 3)


def test_per_layer_recipe(tmp_path) -> None:
    rules = pk.PerLayer({"0": pk.UnstructuredConfig(sparsity=0.8), "_default": None})
    report = run_recipe(_recipe(prune=rules, schedule=None, finetune=None), tmp_path, progress=False)
    assert report["pruned"]["layers"]["0"] == pytest.approx(0.8, abs=0.01)
    assert report["pruned"]["layers"]["2"] == 0.0


def test_language_model_recipe_reports_perplexity(tmp_path) -> None:
    code, output = _run_cli(tmp_path, f"""_type: Recipe
model: {EP}:build_tiny_lm
data: {EP}:text_data
calibration: 2
prune: {{_type: NMConfig, n: 2, m: 4, criterion: sparsegpt}}
recover: {{_type: RecoveryConfig, tokens: 256, lr: 0.001}}
report: {{_type: ReportSettings, seq_len: 32, prompt_tokens: 8, decode_tokens: 2, repeats: 2}}
""")
    assert code == 0, output
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    ppl = report["perplexity"]
    assert [s["segment"] for s in ppl["segments"]] == ["counting", "noise"]
    assert ppl["pruned"] > 0 and ppl["hardest"]["tokens"] > 0 and "perplexity within 10 %" in output
    assert report["speed"]["pruned"]["decode_tokens_per_s"] > 0
    assert report["stages_s"]["recover"] > 0
    md = (tmp_path / "out" / "report.md").read_text()
    assert "Perplexity by segment" in md and "hardest 10%" in md


@pytest.mark.parametrize(
    ("override", "needle"),
    [({"data": f"{EP}:short_text_data", "prune": pk.UnstructuredConfig(sparsity=0.5)},
      "segment 'all' has 10 tokens, shorter than one window of 512"),
     ({"allocate": pk.AllocateStage(target=pk.SparsityTarget(sparsity=0.5)), "data": None},
      "recipe.allocate scores each unit on held-out data and the recipe has none: set recipe.data"),
     ({"finetune": FinetuneConfig(), "data": f"{EP}:text_data"}, "for a language model .* use recipe.recover"),
     ({"calibration": 3, "data": None, "prune": pk.UnstructuredConfig(sparsity=0.5, criterion="wanda")},
      r"recipe.calibration = 3 takes the first 3 training batches: set recipe.data")])
def test_a_stage_without_its_data_names_the_field(tmp_path, override: dict, needle: str) -> None:
    fields = {"model": f"{EP}:build_tiny_lm", "schedule": None, "finetune": None, **override}
    with pytest.raises(pk.ConfigError, match=needle):
        run_recipe(_recipe(**fields), tmp_path, progress=False)


@pytest.mark.parametrize("name", ["digits_channels", "digits_wanda", "mnist_workflow", "smollm2_sparsegpt24",
                                  "efficientnet_latency"])
def test_worked_recipes_parse_and_name_real_entry_points(name: str) -> None:
    import importlib
    from pathlib import Path

    recipe = pk.load_recipe(Path(__file__).parents[1] / "examples" / "recipes" / f"{name}.yaml")
    assert isinstance(recipe, Recipe)
    for spec in (recipe.model, recipe.data, recipe.example_inputs, recipe.calibration):
        if isinstance(spec, str):
            module, _, fn = spec.partition(":")
            assert callable(getattr(importlib.import_module(module), fn)), spec


def test_channel_allocation_recipe_prunes_each_group_at_its_ratio(tmp_path) -> None:
    """allocate + ChannelConfig: the groups get their own ratios (one channel plan), the plan is saved."""
    from tests.recipe_entry_points import build_cnn

    recipe = _recipe(model=f"{EP}:build_cnn", data=f"{EP}:image_loaders", schedule=None,
                     prune=pk.ChannelConfig(ratio=0.5), finetune=FinetuneConfig(epochs=1, lr=1e-2),
                     allocate=pk.AllocateStage(target=pk.FlopsTarget(reduction=0.3), levels=(0.25, 0.5, 0.75)))
    report = run_recipe(recipe, tmp_path, progress=False)
    levels = json.loads((tmp_path / "allocation.json").read_text())["levels"]
    assert len(levels) >= 2 and report["pruned"]["flops"] < report["baseline"]["flops"]
    model = pk.load(tmp_path / "pruned.safetensors", build_cnn)  # the allocated plan replays on a dense build
    assert pk.count_params(model) == report["pruned"]["params"]
    with pytest.raises(pk.ConfigError, match="drop recipe.schedule"):
        run_recipe(_recipe(model=f"{EP}:build_cnn", data=f"{EP}:image_loaders", prune=pk.ChannelConfig(ratio=0.5),
                           allocate=recipe.allocate), tmp_path / "b", progress=False)


def test_latency_allocation_recipe_measures_its_rounds(tmp_path) -> None:
    """allocate + LatencyTarget: the pruned copy is timed end to end and each round is recorded."""
    recipe = _recipe(model=f"{EP}:build_cnn", data=f"{EP}:image_loaders", schedule=None, finetune=None,
                     prune=pk.ChannelConfig(ratio=0.5),
                     allocate=pk.AllocateStage(target=pk.LatencyTarget(speedup=1.1), levels=(0.25, 0.5, 0.75),
                                               measure_rounds=2))
    run_recipe(recipe, tmp_path, progress=False)
    rounds = json.loads((tmp_path / "allocation.json").read_text())["measured_rounds"]
    assert 1 <= len(rounds) <= 2 and all(r["measured"] > 0 and r["predicted"] > 1.0 for r in rounds)
