"""`prunekit inspect MODEL`: prunable layers, and with example inputs the channel groups and blockers."""

from __future__ import annotations

import torch
from torch import nn
from typer.testing import CliRunner

from prunekit.cli import app
from tests.models import ResidualCNN

runner = CliRunner()


def residual_cnn() -> nn.Module:
    """Model entry point for these tests (this module also provides `example_inputs`)."""
    torch.manual_seed(0)
    return ResidualCNN()


def example_inputs() -> torch.Tensor:
    return torch.randn(2, 1, 12, 12)


def test_groups_from_the_entry_points_example_inputs_name_coupled_and_blocked_layers() -> None:
    result = runner.invoke(app, ["inspect", "tests.test_cli_inspect:residual_cnn", "--exclude", "conv1"])
    assert result.exit_code == 0, result.output
    out = result.output
    assert "prunable channel groups: 1" in out  # conv1 is excluded: only the residual stream is left
    # The residual add couples the stem conv with conv2 (and their BatchNorms): one group of 16.
    assert "[0] 16 channels: outputs of conv2, stem.0" in out
    assert "coupled layers (6): bn2, conv1, conv2, head, stem.0, stem.1" in out  # conv1/head: their inputs
    assert "conv1: excluded" in out
    assert "head: feeds the model output" in out


def test_input_shape_traces_a_plain_model() -> None:
    result = runner.invoke(app, ["inspect", "tests.recipe_entry_points:build_model", "--input-shape", "4,12"])
    assert result.exit_code == 0, result.output
    assert "[0] 32 channels: outputs of 0" in result.output
    assert "coupled layers (2): 0, 2" in result.output
    assert "2: feeds the model output" in result.output


def test_without_inputs_it_says_how_to_get_groups_and_bad_shapes_fail_naming_the_option() -> None:
    result = runner.invoke(app, ["inspect", "tests.recipe_entry_points:build_model"])
    assert result.exit_code == 0 and "--input-shape" in result.output
    bad = runner.invoke(app, ["inspect", "tests.recipe_entry_points:build_model", "--input-shape", "4,x"])
    assert bad.exit_code == 2 and "--input-shape" in bad.output
