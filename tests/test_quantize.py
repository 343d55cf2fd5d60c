"""INT8 on top of pruning: zeros stay zero, per-channel symmetric scales, outputs stay close."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import prunekit as pk
from prunekit.config import config_from_dict, config_to_dict
from prunekit.deploy.int8 import int8_sparsity
from prunekit.deploy.quantize import DynamicInt8Config, StaticInt8Config, finalized_copy, quantize
from prunekit.errors import ConfigError
from tests.models import ZOO, ResidualCNN


def _pruned_mlp(sparsity: float = 0.8) -> nn.Module:
    torch.manual_seed(0)
    return pk.prune(ZOO["mlp"][0]().eval(), pk.UnstructuredConfig(sparsity=sparsity))


@pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::UserWarning")
def test_dynamic_int8_keeps_every_zero_exactly() -> None:
    model = _pruned_mlp()
    q = quantize(model, DynamicInt8Config())
    floats = dict(model.named_modules())
    quantized = {fqn: m for fqn, m in q.named_modules() if fqn in ("1", "3", "5")}
    assert len(quantized) == 3
    for fqn, module in quantized.items():
        w = module.weight()
        assert w.qscheme() in (torch.per_channel_symmetric, torch.per_channel_affine)
        assert w.q_per_channel_scales().numel() == w.shape[0]  # one scale per output channel
        assert bool((w.q_per_channel_zero_points() == 0).all())  # symmetric: 0 -> 0
        assert torch.equal(w.int_repr() == 0, floats[fqn].weight == 0)  # the very same zeros
        assert int(w.int_repr().min()) >= -127
    report = pk.sparsity(model)
    assert int8_sparsity(q) == pytest.approx(report.layers)


@pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::UserWarning")
def test_dynamic_int8_output_close_and_model_untouched() -> None:
    model = _pruned_mlp()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(32, 1, 8, 8)
    q = quantize(model, DynamicInt8Config())
    with torch.no_grad():
        ref, got = model(x), q(x)
    assert (got - ref).abs().max() < 0.05 * ref.abs().max()
    assert pk.core.masks.get_mask(model[1]) is not None  # the masked input is still masked
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


@pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::UserWarning")
def test_exclude_leaves_layer_float_and_typos_fail() -> None:
    model = _pruned_mlp()
    q = quantize(model, DynamicInt8Config(exclude=("5",)))
    assert type(q[5]) is nn.Linear and type(q[1]) is not nn.Linear
    with pytest.raises(ConfigError, match="'nope'"):
        quantize(model, DynamicInt8Config(exclude=("nope",)))


def test_configs_are_frozen_recipes() -> None:
    cfg = StaticInt8Config(calibration_batches=4)
    assert config_from_dict(config_to_dict(cfg)) == cfg
    with pytest.raises(ConfigError, match="calibration_batch"):
        StaticInt8Config(calibration_batchs=4)
    with pytest.raises(ConfigError, match="no quantizer"):
        quantize(_pruned_mlp(), pk.UnstructuredConfig(sparsity=0.5))


def test_finalized_copy_leaves_original_masked() -> None:
    model = _pruned_mlp()
    clone = finalized_copy(model)
    assert pk.core.masks.get_mask(model[1]) is not None and pk.core.masks.get_mask(clone[1]) is None
    x = torch.randn(4, 1, 8, 8)
    torch.testing.assert_close(clone(x), model(x))


def test_static_int8_conv_keeps_zeros_and_accuracy_of_outputs() -> None:
    pytest.importorskip("onnxruntime")
    onnx = pytest.importorskip("onnx")
    from onnx import numpy_helper

    torch.manual_seed(0)
    model = pk.prune(ResidualCNN().eval(), pk.UnstructuredConfig(sparsity=0.6))
    data = [(torch.randn(8, 1, 12, 12), None) for _ in range(6)]
    q = quantize(model, StaticInt8Config(calibration_batches=6), data=data)
    x = data[0][0]
    with torch.no_grad():
        ref, got = model(x), q(x)
    assert got.shape == ref.shape
    assert (got - ref).abs().max() < 0.1 * ref.abs().max()
    graph = onnx.load_from_string(q.onnx_model_bytes).graph
    inits = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    for fqn in ("conv1", "conv2"):
        w = inits[f"{fqn}.weight_quantized"]
        assert w.dtype.name == "int8"
        assert ((w == 0) >= (getattr(model, fqn).weight == 0).numpy()).all()


def test_static_int8_needs_data() -> None:
    with pytest.raises(ConfigError, match="data"):
        quantize(ResidualCNN(), StaticInt8Config())
