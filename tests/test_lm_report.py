"""compare_lm: perplexity scored in fp32 or under bf16 autocast, and the choice recorded."""

from __future__ import annotations

import copy

import pytest

import prunekit as pk
from prunekit.measure.lm_report import compare_lm
from tests.recipe_entry_points import build_tiny_lm, text_data


def _reports() -> tuple[dict, dict]:
    baseline = build_tiny_lm()
    pruned = pk.finalize(pk.prune(copy.deepcopy(baseline), pk.UnstructuredConfig(sparsity=0.5)))
    _, held_out = text_data()
    kwargs = {"seq_len": 32, "prompt_tokens": 8, "decode_tokens": 2, "repeats": 1}
    return (compare_lm(baseline, pruned, held_out, **kwargs).data,
            compare_lm(baseline, pruned, held_out, precision="bf16", **kwargs).data)


def test_bf16_scoring_is_recorded_and_close_to_fp32() -> None:
    fp32, bf16 = _reports()
    assert (fp32["precision"], bf16["precision"]) == ("fp32", "bf16")
    for who in ("baseline", "pruned"):
        assert bf16["perplexity"][who] == pytest.approx(fp32["perplexity"][who], rel=0.02)
    # bf16 rounds the weights' products: the scores are close, not bit-identical.
    assert bf16["perplexity"]["pruned"] != fp32["perplexity"]["pruned"]


def test_unknown_precision_is_named() -> None:
    model = build_tiny_lm()
    with pytest.raises(pk.ConfigError, match="precision='fp16'"):
        compare_lm(model, model, text_data()[1], seq_len=32, precision="fp16")
