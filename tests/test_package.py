"""The package surface: lean import, public names, CLI errors."""

from __future__ import annotations

import subprocess
import sys

import prunekit as pk


def test_import_is_lean() -> None:
    code = (
        "import sys, prunekit\n"
        "heavy = [m for m in ('onnx', 'onnxruntime', 'matplotlib', 'optuna', 'transformers') if m in sys.modules]\n"
        "print(','.join(heavy))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", f"import prunekit loaded {out.stdout.strip()}"


def test_public_names_exist() -> None:
    for name in pk.__all__:
        assert hasattr(pk, name), name


def test_cli_bad_sparsity_is_a_clear_error() -> None:
    from typer.testing import CliRunner

    from prunekit.cli import app

    result = CliRunner().invoke(app, ["demo", "--sparsity", "1.0", "--out", "/tmp/never"])
    assert result.exit_code == 2
    assert "sparsity" in result.output


def test_cli_inspect_names_bad_file(tmp_path) -> None:
    from typer.testing import CliRunner

    from prunekit.cli import app

    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x00" * 10)
    result = CliRunner().invoke(app, ["inspect", str(bad)])
    assert result.exit_code == 2 and "bad.safetensors" in result.output
