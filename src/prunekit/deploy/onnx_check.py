"""Check that an ONNX file kept what pruning bought: shapes, zeros, N:M groups and outputs.

Each PyTorch tensor is first found among the file's initializers (`onnx_match`: exporters
rename, transpose, fold and quantize weights; sparse initializers are densified). Every pruned
tensor must be found and keep its zeros, N:M groups and values; a dense tensor that is not
found (folded away, say) is listed in the report instead. Then the outputs are compared with
PyTorch's on real batches.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor, nn

from prunekit.core.extras import require
from prunekit.core.masks import PRUNABLE_TYPES, get_mask, nm_groups
from prunekit.deploy.int8 import is_quantized_linear
from prunekit.deploy.onnx_match import initializer_arrays, match_initializers, values_match
from prunekit.errors import ConfigError, ExportCheckError
from prunekit.storage.files import sniff_format

_NM_CANDIDATES = ((2, 4), (4, 8), (1, 4))


def require_onnx() -> Any:
    """Import onnx and onnxruntime, or raise an error naming the pip extra."""
    require("onnxruntime", extra="onnx", what="ONNX export")
    return require("onnx", extra="onnx", what="ONNX export")


@dataclass(frozen=True)
class TensorCheck:
    """How one PyTorch weight was found in the ONNX file, and what it looks like there."""

    name: str
    onnx_name: str
    shape: tuple[int, ...]
    sparsity: float
    onnx_sparsity: float
    layout: Literal["same", "transposed"]
    values: Literal["exact", "scaled"]
    nm: tuple[int, int] | None = None


@dataclass(frozen=True)
class CheckResult:
    """Per-tensor checks, unmatched dense tensors, and the worst output difference."""

    tensors: tuple[TensorCheck, ...]
    unmapped: tuple[str, ...]
    max_abs_diff: float
    batches: int


# --------------------------------------------------------------------------------------------
# Reference tensors: the weights of prunable layers, in PyTorch layout.


def reference_weights(model: nn.Module) -> dict[str, np.ndarray]:
    """FQN -> weight (float64 array) of every prunable or quantized layer; int8 as integers."""
    if hasattr(model, "prunekit_reference_weights"):  # an onnxruntime-backed INT8 module
        return dict(model.prunekit_reference_weights())  # type: ignore[operator]
    out = {}
    for fqn, module in model.named_modules():
        weight = _module_weight(module)
        if weight is not None:
            out[f"{fqn}.weight" if fqn else "weight"] = weight
    return out


def _module_weight(module: nn.Module) -> np.ndarray | None:
    if isinstance(module, PRUNABLE_TYPES) or get_mask(module) is not None:
        return module.weight.detach().cpu().double().numpy()  # type: ignore[operator]
    if is_quantized_linear(module):
        return module.weight().int_repr().double().numpy()  # type: ignore[operator]
    return None


# --------------------------------------------------------------------------------------------
# INT8 models: what the file is checked against.


def is_int8(model: nn.Module) -> bool:
    """True for a model holding PyTorch quantized modules or an onnxruntime INT8 module."""
    return hasattr(model, "onnx_model_bytes") or any(is_quantized_linear(mod) for mod in model.modules())


class _MatMulLinear(nn.Linear):
    """A Linear the exporter writes as MatMul (+ Add), never Gemm: onnxruntime's quantizer
    rewrites Gemm nodes under new names, so a per-node choice of what to quantize would miss."""

    def forward(self, x: Tensor) -> Tensor:
        y = torch.matmul(x, self.weight.t())
        return y + self.bias if self.bias is not None else y


def float_twin(model: nn.Module) -> nn.Module:
    """A float copy of a dynamic-INT8 model (`model` is untouched): each quantized Linear becomes
    an `nn.Linear` holding its dequantized weight (exactly int8 * scale), so zeros stay exactly zero.

    The exporter writes the twin (then onnxruntime re-quantizes it), and the check compares
    outputs against it: the same int8 weights, float activations.
    """
    twin = copy.deepcopy(model)
    for fqn, module in list(twin.named_modules()):
        if not is_quantized_linear(module):
            continue
        weight, bias = module.weight().dequantize(), module.bias()
        linear = _MatMulLinear(module.in_features, module.out_features, bias=bias is not None)
        with torch.no_grad():
            linear.weight.copy_(weight)
            if bias is not None:
                linear.bias.copy_(bias)
        parent_name, _, child = fqn.rpartition(".")
        setattr(twin.get_submodule(parent_name) if parent_name else twin, child, linear)
    return twin.eval()


# --------------------------------------------------------------------------------------------
# Per-tensor checks.


def nm_ok(weight: np.ndarray, n: int, m: int) -> bool:
    """True if every group of `m` consecutive input channels (dim 1) holds at most `n` non-zeros."""
    if weight.ndim < 2 or weight.shape[1] % m:
        return False
    groups, _ = nm_groups(torch.from_numpy(weight != 0), m)  # a fresh bool array: safe to share
    return bool((groups.sum(dim=1) <= n).all())


def detect_nm(weight: np.ndarray) -> tuple[int, int] | None:
    """The N:M pattern `weight` follows exactly (at the pattern's sparsity), or None."""
    for n, m in _NM_CANDIDATES:
        # At the pattern's own sparsity (plus a few natural zeros): a very sparse unstructured
        # tensor satisfies every pattern by chance and is checked by its zeros instead.
        if nm_ok(weight, n, m) and 0 <= (weight == 0).mean() - (1 - n / m) <= 0.02:
            return n, m
    return None


def check_tensor(key: str, ref: np.ndarray, onnx_name: str, arr: np.ndarray, layout: str,
                 integer: bool, nm: tuple[int, int] | None) -> TensorCheck:
    """Check one matched tensor; raise `ExportCheckError` naming it on any loss."""
    where = f"tensor {key!r} (ONNX initializer {onnx_name!r})"
    if arr.shape != ref.shape:
        raise ExportCheckError(f"{where}: shape {arr.shape} != PyTorch {ref.shape}")
    want, got = float((ref == 0).mean()), float((arr == 0).mean())
    pattern = nm or detect_nm(ref)
    if pattern is not None and not nm_ok(arr, *pattern):
        raise ExportCheckError(f"{where}: a {pattern[0]}:{pattern[1]} group is broken (more than "
                               f"{pattern[0]} non-zeros in {pattern[1]} consecutive inputs)")
    lost = int(((ref == 0) & (arr != 0)).sum())
    if lost:
        raise ExportCheckError(f"{where}: sparsity dropped from {want:.2%} to {got:.2%} "
                               f"({lost} pruned weights are non-zero in the file)")
    values = values_match(ref, arr, integer)
    if values is None:
        diff = np.abs(arr - ref)
        idx = np.unravel_index(int(diff.argmax()), diff.shape)
        raise ExportCheckError(f"{where}: values differ from PyTorch (at index {tuple(int(i) for i in idx)}: "
                               f"{arr[idx]:.6g} vs {ref[idx]:.6g}), beyond a per-channel scale")
    return TensorCheck(key, onnx_name, tuple(ref.shape), want, got, layout, values, pattern)  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------------
# The whole check.


def validate_nm(n: int | None, m: int | None) -> None:
    """Raise `ConfigError` unless n and m are both None or satisfy 0 < n < m."""
    if (n is None) != (m is None) or (n is not None and m is not None and not 0 < n < m):
        raise ConfigError(f"export check: give both n and m with 0 < n < m, got n={n!r}, m={m!r}")


def _as_tuple(inputs: Any) -> tuple[Tensor, ...]:
    return tuple(inputs) if isinstance(inputs, (tuple, list)) else (inputs,)


def _leaves(output: Any) -> list[np.ndarray]:
    return [t.detach().cpu().numpy() for t in _leaf_tensors(output)]


def compare_outputs(model: nn.Module, session: Any, batches: Iterable[tuple[Tensor, ...]],
                    atol: float, rtol: float, twin: nn.Module | None = None) -> tuple[float, int]:
    """Run PyTorch and onnxruntime on each batch; the worst |difference| and batch count.

    Float models: |ort - torch| <= atol + rtol * |torch| per element. Dynamic-INT8 models
    (`twin` given: the same int8 weights with float activations): onnxruntime and PyTorch
    quantize activations differently (fbgemm keeps a 7-bit range on x86), so each runtime's
    relative L2 error against the twin is measured, and onnxruntime's may be at most twice
    PyTorch's plus `rtol` (plus `atol` absolute): a wrong scale or a broken graph fails.
    """
    names = [i.name for i in session.get_inputs()]
    worst, count = 0.0, 0
    for inputs in batches:
        with torch.no_grad():
            expected = _leaves(model(*inputs))
            base = _leaves(twin(*inputs)) if twin is not None else expected
        feed = {n: t.detach().cpu().numpy() for n, t in zip(names, inputs, strict=False)}
        got = session.run(None, feed)
        for i, (e, g, b) in enumerate(zip(expected, got, base, strict=False)):
            if e.shape != g.shape:
                raise ExportCheckError(f"output {i}: onnxruntime shape {g.shape} != PyTorch {e.shape}")
            e64, g64, b64 = e.astype(np.float64), g.astype(np.float64), b.astype(np.float64)
            diff = np.abs(g64 - e64)
            worst = max(worst, float(diff.max(initial=0.0)))
            if twin is None:
                bad = int((diff > atol + rtol * np.abs(e64)).sum())
                if bad:
                    raise ExportCheckError(
                        f"output {i} (batch {count}): onnxruntime differs from PyTorch by up to "
                        f"{float(diff.max()):.3g} at {bad} places (tolerance atol={atol:g}, rtol={rtol:g})")
                continue
            norm = max(float(np.linalg.norm(b64)), 1e-12)
            ort_err, pt_err = np.linalg.norm(g64 - b64) / norm, np.linalg.norm(e64 - b64) / norm
            if ort_err > 2 * pt_err + rtol + atol / norm:
                raise ExportCheckError(
                    f"output {i} (batch {count}): onnxruntime's INT8 error {ort_err:.3%} (relative L2 "
                    f"against float activations) exceeds twice PyTorch's {pt_err:.3%} + {rtol:g}")
        count += 1
    return worst, count


def check_onnx(
    model: nn.Module,
    onnx_model: Any,
    example_inputs: Any,
    *,
    data: Iterable[Any] | None = None,
    max_batches: int = 3,
    n: int | None = None,
    m: int | None = None,
    atol: float = 1e-4,
    rtol: float = 1e-4,
) -> CheckResult:
    """Verify an exported file against `model`; raises `ExportCheckError` naming what broke.

    Args:
        model: the PyTorch model that was exported (masked, finalized or dynamic-INT8).
        onnx_model: a path, the file's bytes, or an `onnx.ModelProto`; dense and sparse
            initializers are both read.
        example_inputs: a tensor or tuple of tensors the model takes.
        data: real batches: `x`, or a tuple whose first k items are the model's k inputs
            (`(x, y)`, `(input_ids, attention_mask)`); up to `max_batches` of them are run
            through both runtimes as well.
        n, m: check every weight for this N:M pattern; by default a pattern is detected per
            tensor from the PyTorch weight (2:4, 4:8, 1:4).
        atol, rtol: output tolerance, |ort - torch| <= atol + rtol * |torch| elementwise; for a
            dynamic-INT8 model see `compare_outputs` (rtol is then a relative L2 margin).

    Returns:
        A `CheckResult` with one `TensorCheck` per weight found.

    Raises:
        ExportCheckError: a pruned tensor is missing or lost zeros, an N:M group is broken, a
            weight changed, or an output differs beyond the tolerance; the message names it.
    """
    onnx = require_onnx()
    import onnxruntime as ort

    proto = onnx_model if isinstance(onnx_model, onnx.ModelProto) else load_onnx(onnx_model)
    validate_nm(n, m)
    model.eval()
    used = _used_weights(model, _as_tuple(example_inputs))
    refs = reference_weights(model)
    inits = initializer_arrays(proto)
    found = match_initializers(refs, inits)
    checks, unmapped = [], []
    for key, ref in refs.items():
        if key not in found and used is not None and key not in used:
            unmapped.append(f"{key} (unused by the outputs)")
            continue
        if key not in found:
            if (ref == 0).any():
                raise ExportCheckError(f"tensor {key!r} ({(ref == 0).mean():.2%} sparse) has no matching "
                                       "initializer in the ONNX file: its zeros, values or shape were lost")
            unmapped.append(key)
            continue
        name, arr, layout = found[key]
        integer = inits[name].dtype.kind == "i"
        checks.append(check_tensor(key, ref, name, arr, layout, integer, (n, m) if n else None))  # type: ignore[arg-type]
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    batches = [_as_tuple(example_inputs)]
    for batch in list(_take(data, max_batches)):
        # A batch holds the model's k inputs first, then anything else (labels): (x, y) or (ids, mask).
        batches.append(tuple(batch[: len(batches[0])]) if isinstance(batch, (tuple, list)) else (batch,))
    twin = float_twin(model) if is_int8(model) and not hasattr(model, "onnx_model_bytes") else None
    worst, count = compare_outputs(model, session, batches, atol, rtol, twin)
    return CheckResult(tuple(checks), tuple(unmapped), worst, count)


def load_onnx(source: bytes | str | Path) -> Any:
    """Parse an ONNX file or bytes (protobuf: data only, nothing is executed); errors name the file.

    Raises:
        ExportCheckError: the file is missing, another format (a pickle, a torch.save zip), or
            not a parseable ONNX model.
    """
    onnx = require_onnx()
    from google.protobuf.message import DecodeError

    what = "the ONNX bytes" if isinstance(source, bytes) else repr(str(source))
    try:
        raw = source if isinstance(source, bytes) else Path(source).read_bytes()
    except OSError as err:
        raise ExportCheckError(f"ONNX file {what} cannot be read: {err.strerror}") from None
    found = sniff_format(raw[:8])
    if found is not None:
        raise ExportCheckError(f"{what} is not an ONNX model: it is {found}, and prunekit never unpickles")
    try:
        proto = onnx.load_from_string(raw)
    except (DecodeError, ValueError, RuntimeError) as err:
        raise ExportCheckError(f"{what} is not a valid ONNX model (protobuf): {err}") from None
    if not proto.graph.node and not proto.graph.initializer:
        raise ExportCheckError(f"{what} is not a valid ONNX model: it has an empty graph")
    if not isinstance(source, bytes):
        from onnx.external_data_helper import load_external_data_for_model, uses_external_data

        if any(uses_external_data(t) for t in proto.graph.initializer):
            try:  # onnx refuses locations outside the model's folder (path traversal)
                load_external_data_for_model(proto, str(Path(source).resolve().parent))
            except (OSError, ValueError, onnx.checker.ValidationError) as err:
                raise ExportCheckError(f"{what}: its external tensor data cannot be loaded: {err}") from None
    return proto


def _used_weights(model: nn.Module, inputs: tuple[Tensor, ...]) -> set[str] | None:
    """Weight keys ('fc.weight') the outputs depend on, found by autograd; None if unknown.

    The exporter drops layers whose output is unused (a pooler nobody reads), so only those
    may be missing from the file. A dynamic-INT8 model is probed through its float twin.
    """
    if hasattr(model, "onnx_model_bytes"):
        return None
    probe = float_twin(model) if is_int8(model) else model
    params = {name.replace(".parametrizations.weight.original", ".weight"): p
              for name, p in probe.named_parameters() if name.endswith("weight") or name.endswith("original")}
    if not params:
        return None
    flags = {p: p.requires_grad for p in params.values()}
    try:
        for p in params.values():
            p.requires_grad_(True)
        with torch.enable_grad():
            outputs = [t for t in _leaf_tensors(probe(*inputs)) if t.requires_grad]
            if not outputs:
                return None
            total = torch.stack([t.float().sum() for t in outputs]).sum()
            grads = torch.autograd.grad(total, list(params.values()), allow_unused=True)
    finally:
        for p, flag in flags.items():
            p.requires_grad_(flag)
    return {key for key, g in zip(params, grads, strict=True) if g is not None}


def _leaf_tensors(output: Any) -> list[Tensor]:
    from torch.utils._pytree import tree_leaves

    if hasattr(output, "to_tuple"):
        output = output.to_tuple()
    return [t for t in tree_leaves(output) if isinstance(t, Tensor)]


def _take(data: Iterable[Any] | None, count: int) -> Iterable[Any]:
    if data is None:
        return
    for i, item in enumerate(data):
        if i >= count:
            return
        yield item
