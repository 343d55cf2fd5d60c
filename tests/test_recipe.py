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


def test_entry_point_form_is_validated() -> None:
    with pytest.raises(pk.ConfigError, match="Recipe.model"):
        _recipe(model="just_a_module")


def test_misspelt_recipe_key_fails_in_cli(tmp_path) -> None:
    path = tmp_path / "r.yaml"
    path.write_text(f"_type: Recipe\nmodel: {EP}:build_model\nprune: {{_type: UnstructuredConfig, sparsity: 0.5}}\n"
                    "finetun: {_type: FinetuneConfig}\n")
    result = CliRunner().invoke(app, ["prune", "--recipe", str(path), "--out", str(tmp_path / "o")])
    assert result.exit_code == 2 and "finetun" in result.output
