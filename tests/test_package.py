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


def test_old_module_paths_warn_and_forward() -> None:
    """0.1 deep imports keep working for one release: each warns with its new path and forwards
    every name (run in a fresh interpreter, where none of the old paths is imported yet)."""
    code = (
        "import importlib, warnings\n"
        "from prunekit._moved import MODULES\n"
        "for old, new in MODULES.items():\n"
        "    with warnings.catch_warnings(record=True) as seen:\n"
        "        warnings.simplefilter('always')\n"
        "        alias, target = importlib.import_module(old), importlib.import_module(new)\n"
        "        names = [n for n in vars(target) if not n.startswith('__')]\n"
        "        assert names and all(getattr(alias, n) is getattr(target, n) for n in names), old\n"
        "    assert any(f'{old} moved to {new}' in str(w.message) for w in seen), old\n"
        "print(len(MODULES))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert int(out.stdout) >= 30


def test_old_paths_keep_the_verbs_and_moved_names() -> None:
    """`import prunekit.plan` (the old module) must not shadow the verb; moved names forward."""
    code = (
        "import warnings; warnings.simplefilter('ignore')\n"
        "import torch, prunekit as pk\n"
        "import prunekit.plan, prunekit.quantize, prunekit.search, prunekit.sensitivity, prunekit.allocate\n"
        "from prunekit.config import UnstructuredConfig\n"
        "from prunekit.structured import prune_iteratively\n"
        "assert UnstructuredConfig is pk.UnstructuredConfig and prune_iteratively is pk.prune_iteratively\n"
        "assert pk.masks.finalize is pk.finalize\n"
        "import importlib\n"
        "from prunekit._moved import NAMES\n"
        "for (old, name), new in NAMES.items():\n"
        "    assert getattr(importlib.import_module(old), name) is getattr(importlib.import_module(new), name), name\n"
        "model = torch.nn.Sequential(torch.nn.Linear(4, 4))\n"
        "print(type(pk.plan(model, pk.UnstructuredConfig(sparsity=0.5))).__name__)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "MaskPlan"
