"""INT8 on top of pruning that keeps the zeros zero: `quantize(model, config, data=...)`.

Every weight is quantized per output channel and *symmetrically* (zero point 0, scale =
max|w| / 127, integers in [-127, 127]), so q = round(0 / scale) = 0: a pruned weight is an int8
zero, exactly, and sparse storage and N:M patterns survive quantization (asymmetric schemes
shift zero to the zero point and lose both).

Two methods, one verb, dispatched on the config's type:

* `DynamicInt8Config` (Linear layers; transformers, MLPs): PyTorch's own
  `torch.ao.quantization.quantize_dynamic`, int8 weights and activations quantized per batch at
  run time by fbgemm/oneDNN kernels. It is deprecated in favour of torchao, but torch 2.13 still
  ships it and it runs on every CPU, while torchao's int8 CPU path needs a matching torchao
  build and `torch.compile` to be fast.
* `StaticInt8Config` (conv nets): onnxruntime's static quantizer with calibration, returning
  an `OrtModule` (an `nn.Module` running the INT8 ONNX model). Why onnxruntime and not PyTorch:
  PyTorch's static paths (eager, FX) are deprecated and its PT2E path moved to torchao; a conv
  net's deployment artefact is the ONNX file anyway, and onnxruntime's QDQ graph runs fused
  int8 Conv kernels (MLAS) on x86 and ARM alike.
"""

from __future__ import annotations

import copy
import logging
import tempfile
import warnings
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pydantic import Field
from torch import Tensor, nn

from prunekit._moved import moved_name
from prunekit._registry import Registry
from prunekit.config import FrozenConfig, recipe_type
from prunekit.core.masks import finalize
from prunekit.core.targets import matches
from prunekit.deploy.int8 import is_quantized_linear
from prunekit.deploy.onnx_check import reference_weights
from prunekit.deploy.onnx_export import onnx_bytes
from prunekit.errors import ConfigError, PrunekitError

log = logging.getLogger(__name__)

QMIN, QMAX = -127, 127  # symmetric: -128 is never used, so the scale is exactly max|w| / 127


@recipe_type
class DynamicInt8Config(FrozenConfig):
    """Dynamic INT8 for every `nn.Linear`: int8 per-channel weights, activations quantized at run time.

    Args:
        exclude: Linear FQNs or "re:<regex>" patterns to leave in float.

    Example:
        >>> DynamicInt8Config(exclude=("re:.*classifier.*",))
        DynamicInt8Config(exclude=('re:.*classifier.*',))
    """

    exclude: tuple[str, ...] = ()


@recipe_type
class StaticInt8Config(FrozenConfig):
    """Static INT8 through onnxruntime: activation ranges calibrated on `data` (MinMax).

    Args:
        calibration_batches: how many batches of `data` to calibrate on.
        opset: ONNX opset of the exported float model.
    """

    calibration_batches: int = Field(default=16, ge=1)
    opset: int = Field(default=20, ge=18)


QuantizeFn = Callable[[nn.Module, Any, "Iterable[Any] | None", Any], nn.Module]
_QUANTIZERS: Registry[type[FrozenConfig], QuantizeFn] = Registry("quantizer")


def register_quantizer(config_type: type[FrozenConfig]) -> Callable[[QuantizeFn], QuantizeFn]:
    """Decorator: quantize configs of `config_type` with the decorated function (a type registers once).

    Raises:
        ConfigError: `config_type` already has a quantizer.
    """
    return _QUANTIZERS.decorator(config_type)


def quantize(
    model: nn.Module, config: FrozenConfig, data: Iterable[Any] | None = None, example_inputs: Any = None
) -> nn.Module:
    """Return an INT8 copy of `model` as `config` says; `model` is not mutated.

    Pruned zeros stay exactly zero (symmetric per-channel scales); this is checked for every
    quantized weight. Masked models are quantized as their effective (masked) weights.

    Args:
        model: a float model, masked or finalized.
        config: `DynamicInt8Config` or `StaticInt8Config`.
        data: calibration batches (`x` or `(x, y, ...)`), needed by static quantization.
        example_inputs: inputs to export with (static); defaults to the first batch of `data`.

    Raises:
        ConfigError: unknown config type, or static quantization without data.

    Example:
        >>> q = quantize(model, DynamicInt8Config())  # doctest: +SKIP
    """
    fn = _QUANTIZERS.find(type(config))
    if fn is None:
        raise ConfigError(f"no quantizer for {type(config).__name__}; known: {', '.join(_QUANTIZERS.names())}")
    return fn(model, config, data, example_inputs)


def finalized_copy(model: nn.Module) -> nn.Module:
    """A deep copy of `model` with masks baked into plain weights (`model` is untouched)."""
    return finalize(copy.deepcopy(model))


# --------------------------------------------------------------------------------------------
# Dynamic INT8 (PyTorch).


def _weight_qconfig() -> Any:
    from torch.ao.quantization import PerChannelMinMaxObserver, PlaceholderObserver, QConfig

    return QConfig(
        activation=PlaceholderObserver.with_args(dtype=torch.quint8, is_dynamic=True),
        weight=PerChannelMinMaxObserver.with_args(
            dtype=torch.qint8, qscheme=torch.per_channel_symmetric, quant_min=QMIN, quant_max=QMAX
        ),
    )


@register_quantizer(DynamicInt8Config)
def _quantize_dynamic(
    model: nn.Module, config: DynamicInt8Config, data: Any, example_inputs: Any
) -> nn.Module:
    from torch.ao.quantization import quantize_dynamic

    float_model = finalized_copy(model).eval()
    linears = [fqn for fqn, m in float_model.named_modules() if type(m) is nn.Linear]
    for pattern in config.exclude:
        if not any(matches(pattern, fqn) for fqn in linears):
            raise ConfigError(f"DynamicInt8Config.exclude: {pattern!r} matches no nn.Linear "
                              f"(layers: {', '.join(linears[:6])})")
    excluded = {fqn for fqn in linears if any(matches(p, fqn) for p in config.exclude)}
    spec = {fqn: _weight_qconfig() for fqn in linears if fqn not in excluded}
    if not spec:
        raise ConfigError("DynamicInt8Config: no nn.Linear left to quantize in "
                          f"{type(model).__name__} (exclude={config.exclude!r})")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao's deprecation notice, once per layer
        quantized = quantize_dynamic(float_model, spec, dtype=torch.qint8, inplace=False)
    _check_zeros_kept(float_model, quantized)
    return quantized


def _check_zeros_kept(float_model: nn.Module, quantized: nn.Module) -> None:
    floats = dict(float_model.named_modules())
    for fqn, module in quantized.named_modules():
        if not is_quantized_linear(module):
            continue
        q = module.weight()
        lost = int(((floats[fqn].weight == 0) & (q.int_repr() != 0)).sum())
        if lost or bool((q.q_per_channel_zero_points() != 0).any()):
            raise PrunekitError(f"layer {fqn!r}: INT8 quantization made {lost} pruned weights non-zero")


# --------------------------------------------------------------------------------------------
# Static INT8 (onnxruntime).


class OrtModule(nn.Module):
    """An `nn.Module` that runs an ONNX model in onnxruntime (the result of static INT8).

    `onnx_model_bytes` is the file; `export_onnx` writes and checks it like any model. The
    float source's weights are kept as `reference` so the check can compare zeros with them.
    """

    def __init__(self, onnx_model_bytes: bytes, reference: dict[str, np.ndarray] | None = None) -> None:
        super().__init__()
        self.onnx_model_bytes = onnx_model_bytes
        self.reference = dict(reference or {})
        self._session: Any = None

    def prunekit_reference_weights(self) -> dict[str, np.ndarray]:
        return dict(self.reference)

    @property
    def session(self) -> Any:
        if self._session is None:
            import onnxruntime as ort

            options = ort.SessionOptions()
            options.log_severity_level = 3
            self._session = ort.InferenceSession(
                self.onnx_model_bytes, options, providers=["CPUExecutionProvider"]
            )
        return self._session

    def forward(self, *inputs: Tensor) -> Any:
        names = [i.name for i in self.session.get_inputs()]
        feed = {n: t.detach().cpu().numpy() for n, t in zip(names, inputs, strict=False)}
        outputs = self.session.run(None, feed)
        tensors = [torch.from_numpy(o) for o in outputs]
        return tensors[0] if len(tensors) == 1 else tuple(tensors)

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_session"] = None  # sessions do not copy or pickle
        return state


class _Calibration:
    """onnxruntime's CalibrationDataReader protocol over prunekit-style batches."""

    def __init__(self, names: list[str], data: Iterable[Any], limit: int) -> None:
        self._batches: Iterator[Any] = iter(data)
        self._names, self._left = names, limit

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self._left <= 0:
            return None
        batch = next(self._batches, None)
        if batch is None:
            return None
        self._left -= 1
        x = batch[0] if isinstance(batch, (tuple, list)) else batch
        inputs = x if isinstance(x, (tuple, list)) else (x,)
        return {n: t.detach().cpu().numpy() for n, t in zip(self._names, inputs, strict=False)}


@register_quantizer(StaticInt8Config)
def _quantize_static(model: nn.Module, config: StaticInt8Config, data: Any, example_inputs: Any) -> OrtModule:
    if data is None:
        raise ConfigError("StaticInt8Config needs calibration batches: pass data=...")
    import onnx
    import onnxruntime as ort
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    float_model = finalized_copy(model).eval()
    if example_inputs is None:
        first = next(iter(data))
        example_inputs = first[0] if isinstance(first, (tuple, list)) else first
    inputs = tuple(example_inputs) if isinstance(example_inputs, (tuple, list)) else (example_inputs,)
    blob = onnx_bytes(float_model, inputs, dynamic_batch=True, opset=config.opset)
    names = [i.name for i in ort.InferenceSession(blob, providers=["CPUExecutionProvider"]).get_inputs()]
    with tempfile.TemporaryDirectory() as tmp:
        src, dst = Path(tmp) / "float.onnx", Path(tmp) / "int8.onnx"
        onnx.save(onnx.load_from_string(blob), str(src))
        root = logging.getLogger()
        was, root.disabled = root.disabled, True  # onnxruntime logs a pre-processing hint at WARNING
        try:
            quantize_static(
                str(src), str(dst), _Calibration(names, data, config.calibration_batches),
                quant_format=QuantFormat.QDQ, per_channel=True, weight_type=QuantType.QInt8,
                activation_type=QuantType.QUInt8, calibrate_method=CalibrationMethod.MinMax,
                extra_options={"WeightSymmetric": True, "ActivationSymmetric": False},
            )
        finally:
            root.disabled = was
        quantized = dst.read_bytes()
    return OrtModule(quantized, reference_weights(float_model))


def __getattr__(name: str) -> Any:  # the INT8 encoding moved to prunekit.deploy.int8 (old path, warns)
    return moved_name(__name__, name)
