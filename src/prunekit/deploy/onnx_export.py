"""`export_onnx`: write a pruned (or INT8) model to ONNX, check the file kept what pruning bought.

The file is built in memory, checked (see `prunekit.deploy.onnx_check`), and only then written
through `prunekit.storage.files.atomic_writer` (a temporary file in the target folder, renamed into place), so
a failed export or a failed check never leaves a file, whole or half, at the target path.

Dynamic INT8 models (`prunekit.quantize` with `DynamicInt8Config`) are exported as a float twin
whose weights are the dequantized int8 weights, then quantized by onnxruntime's dynamic
quantizer with the same per-channel symmetric scheme (scale = max|w| / 127, zero point 0), so
the int8 weights in the file equal PyTorch's and every pruned zero stays an int8 zero.

With `sparse_initializers=True` each initializer that is smaller stored sparse moves to
`graph.sparse_initializer` as an ONNX `SparseTensorProto` (non-zero values plus their int64
linear indices). onnxruntime densifies them when it loads the file; OpenVINO cannot read them.
"""

from __future__ import annotations

import copy
import logging
import lzma
import tempfile
import warnings
import zlib
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from prunekit._moved import moved_name
from prunekit.core.masks import finalize, masked_modules
from prunekit.deploy.int8 import is_quantized_linear
from prunekit.deploy.onnx_check import (
    CheckResult,
    TensorCheck,
    check_onnx,
    float_twin,
    is_int8,
    reference_weights,
    require_onnx,
    validate_nm,
)
from prunekit.deploy.onnx_match import match_initializers
from prunekit.errors import ConfigError, TraceError
from prunekit.storage.files import atomic_writer

log = logging.getLogger(__name__)

MIN_OPSET = 18  # the torch.export-based exporter emits opset 18 and newer
DEFAULT_OPSET = 20
FP32_TOLERANCE = (1e-4, 1e-4)  # (atol, rtol): float kernels differ only in summation order
# onnxruntime quantizes activations per tensor like fbgemm does, but with another range and
# rounding, so an INT8 export's error (relative L2, against float activations) may be at most
# twice PyTorch's INT8 error plus 2 % (see `onnx_check.compare_outputs`).
INT8_TOLERANCE = (0.0, 2e-2)


@dataclass(frozen=True)
class ExportReport:
    """What `export_onnx` wrote and what its check found.

    `zip_bytes` is the file deflated at level 9 (what a .zip download costs) and `lzma_bytes`
    the file xz-compressed; both are 0 when `compress=False`.
    """

    path: Path
    size_bytes: int
    zip_bytes: int
    lzma_bytes: int
    opset: int
    int8: bool
    checked: bool
    tensors: tuple[TensorCheck, ...] = ()
    unmapped: tuple[str, ...] = ()
    max_abs_diff: float | None = None
    batches_checked: int = 0
    atol: float = 0.0
    rtol: float = 0.0
    sparse: tuple[str, ...] = ()

    def summary(self) -> str:
        """The sizes, then one line per checked tensor."""
        lines = [
            f"{self.path}: {self.size_bytes:,} bytes (zip {self.zip_bytes:,}, xz {self.lzma_bytes:,}), "
            f"opset {self.opset}{', INT8' if self.int8 else ''}"
        ]
        if self.sparse:
            lines.append(f"{len(self.sparse)} initializers stored sparse: {', '.join(self.sparse)}")
        if self.checked:
            lines.append(
                f"check passed: {len(self.tensors)} weights matched, outputs within "
                f"atol={self.atol:g} rtol={self.rtol:g} on {self.batches_checked} batches "
                f"(max |diff| {self.max_abs_diff:.3g})"
            )
            for t in self.tensors:
                nm = f" {t.nm[0]}:{t.nm[1]}" if t.nm else ""
                lines.append(f"  {t.name} <- {t.onnx_name} {t.shape} sparsity {t.sparsity:.2%} -> "
                             f"{t.onnx_sparsity:.2%} ({t.layout}, {t.values}){nm}")
            if self.unmapped:
                lines.append(f"  dense, folded or renamed beyond matching: {', '.join(self.unmapped)}")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.summary()


def export_onnx(
    model: nn.Module,
    path: str | Path,
    example_inputs: Any,
    dynamic_batch: bool = True,
    check: bool = True,
    data: Iterable[Any] | None = None,
    *,
    opset: int | None = None,
    n: int | None = None,
    m: int | None = None,
    atol: float | None = None,
    rtol: float | None = None,
    max_batches: int = 3,
    compress: bool = True,
    sparse_initializers: bool = False,
) -> ExportReport:
    """Export `model` to an ONNX file at `path`, checked, written atomically (does not mutate).

    Works for dense, masked (exported as their effective weights), finalized, N:M,
    structurally pruned and INT8 models (dynamic INT8 from `prunekit.quantize`, or the
    onnxruntime-backed module static INT8 returns).

    Args:
        model: the model; switched to eval mode for the export.
        path: the .onnx file to write; its folder is created.
        example_inputs: a tensor or a tuple of tensors (positional arguments of `forward`).
        dynamic_batch: make dim 0 of every input dynamic (a batch of 1 is traced as 2 so the
            exporter does not specialise it).
        check: reload the file and verify every weight (shape, zeros, N:M groups, values) and
            onnxruntime's outputs against PyTorch's on `example_inputs` and on up to
            `max_batches` batches of `data`.
        data: real batches for the output check: `x`, or a tuple whose first k items are the
            model's k inputs (`(x, y)` for a classifier, `(input_ids, attention_mask, ...)`).
        opset: ONNX opset, at least 18 (default 20).
        n, m: the N:M pattern every weight must keep; by default detected per tensor.
        atol, rtol: output tolerance: |ort - torch| <= atol + rtol * |torch| per element,
            default 1e-4/1e-4. A dynamic-INT8 model's outputs are compared by relative L2 error
            against its float-activation twin: onnxruntime's may be at most twice PyTorch's
            plus rtol (default 0.02), since the two quantize activations differently.
        compress: also measure the file's zip (deflate) and xz sizes.
        sparse_initializers: store each initializer as an ONNX `SparseTensorProto` where that is
            smaller than dense (see `sparsify_initializers`: above 2/3 sparsity for float32).
            onnxruntime loads such files; OpenVINO and some other runtimes do not.

    Returns:
        An `ExportReport` with the file size, compressed sizes and per-tensor checks.

    Raises:
        ConfigError: unsupported opset or bad n/m.
        TraceError: the model cannot be exported (it does not trace with torch.export).
        ExportCheckError: the file lost zeros, broke an N:M group, changed a weight or its
            outputs differ; the message names the tensor. Nothing is written then.
        PrunekitError: `path` cannot be written.

    Example:
        >>> report = export_onnx(model, "out/model.onnx", torch.randn(1, 784))  # doctest: +SKIP
        >>> print(report.summary())  # doctest: +SKIP
    """
    onnx = require_onnx()
    opset = _check_opset(onnx, opset)
    validate_nm(n, m)
    path = Path(path)
    inputs = tuple(example_inputs) if isinstance(example_inputs, (tuple, list)) else (example_inputs,)
    int8 = is_int8(model)
    default_atol, default_rtol = INT8_TOLERANCE if int8 else FP32_TOLERANCE
    atol, rtol = (default_atol if atol is None else atol), (default_rtol if rtol is None else rtol)
    was_training = model.training
    model.eval()
    try:
        with atomic_writer(path) as stream:  # fails early, before exporting, if path is unwritable
            blob = onnx_bytes(model, inputs, dynamic_batch=dynamic_batch, opset=opset)
            sparse: tuple[str, ...] = ()
            if sparse_initializers:
                proto = onnx.load_from_string(blob)
                sparse = sparsify_initializers(proto)
                blob = proto.SerializeToString()
            result: CheckResult | None = None
            if check:
                result = check_onnx(model, blob, inputs, data=data, max_batches=max_batches, n=n, m=m,
                                    atol=atol, rtol=rtol)
            stream.write(blob)
    finally:
        model.train(was_training)
    zipped, xz = (compressed_sizes(blob) if compress else (0, 0))
    report = ExportReport(
        path, len(blob), zipped, xz, opset, int8, result is not None,
        result.tensors if result else (), result.unmapped if result else (),
        result.max_abs_diff if result else None, result.batches if result else 0, atol, rtol, sparse,
    )
    log.info("%s", report.summary())
    return report


def compressed_sizes(blob: bytes) -> tuple[int, int]:
    """(deflate level 9, xz preset 6) sizes of `blob` in bytes: what a download costs."""
    return len(zlib.compress(blob, 9)), len(lzma.compress(blob, preset=6))


def _check_opset(onnx: Any, opset: int | None) -> int:
    newest = int(onnx.defs.onnx_opset_version())
    opset = DEFAULT_OPSET if opset is None else opset
    if not isinstance(opset, int) or not MIN_OPSET <= opset <= newest:
        raise ConfigError(f"export_onnx.opset: {opset!r} is not supported; use {MIN_OPSET}..{newest}")
    return opset


# --------------------------------------------------------------------------------------------
# Building the file.


def sparsify_initializers(proto: Any) -> tuple[str, ...]:
    """Move each initializer that is smaller sparse into `graph.sparse_initializer` (mutates `proto`).

    A sparse tensor stores its non-zeros plus one int64 linear index each (the ONNX format
    allows no narrower index type), so it only pays where the non-zeros are few enough: below
    1/3 density for float32, 1/5 for float16, 1/9 for int8. Initializers also listed as graph
    inputs (overridable at run time) stay dense.

    Returns:
        The names of the initializers now stored sparse, in graph order.
    """
    from onnx import helper, numpy_helper

    overridable = {i.name for i in proto.graph.input}
    keep, moved, names = [], [], []
    for init in proto.graph.initializer:
        arr = None if init.name in overridable else numpy_helper.to_array(init)
        if (arr is None or arr.ndim == 0 or arr.dtype.kind not in "fiu"
                or np.count_nonzero(arr) * (arr.itemsize + 8) >= arr.nbytes):
            keep.append(init)
            continue
        flat = arr.reshape(-1)
        where = np.flatnonzero(flat)  # ascending, as the format requires
        values = numpy_helper.from_array(flat[where], init.name)
        indices = numpy_helper.from_array(where.astype(np.int64), f"{init.name}_indices")
        moved.append(helper.make_sparse_tensor(values, indices, list(arr.shape)))
        names.append(init.name)
    if names:
        del proto.graph.initializer[:]
        proto.graph.initializer.extend(keep)
        proto.graph.sparse_initializer.extend(moved)
    return tuple(names)


def onnx_bytes(model: nn.Module, inputs: tuple[Tensor, ...], *, dynamic_batch: bool, opset: int) -> bytes:
    """The serialised ONNX model for `model` (no file is written, nothing is checked)."""
    if hasattr(model, "onnx_model_bytes"):  # an onnxruntime-backed module: it already is a file
        return bytes(model.onnx_model_bytes)  # type: ignore[arg-type]
    if is_int8(model):
        return _int8_bytes(model, inputs, dynamic_batch, opset)
    if masked_modules(model):
        # The exporter folds `original * mask` into one constant only for small tensors: a
        # 300x784 weight stays a run-time Mul of two dense initializers. So a finalized copy
        # is exported (its weights equal the masked ones; the check compares by value).
        model = finalize(copy.deepcopy(model))
    return _export_proto(model, inputs, dynamic_batch, opset).SerializeToString()


def _export_proto(model: nn.Module, inputs: tuple[Tensor, ...], dynamic_batch: bool, opset: int) -> Any:
    dynamic_shapes = None
    if dynamic_batch:
        from torch.export import Dim

        batch = Dim("batch")
        # torch.export specialises size-1 dims, so a batch of 1 is traced as a batch of 2.
        inputs = tuple(t.expand(2, *t.shape[1:]).contiguous() if t.ndim and t.shape[0] == 1 else t
                       for t in inputs)
        dynamic_shapes = tuple({0: batch} if t.ndim else None for t in inputs)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            program = torch.onnx.export(model, inputs, dynamo=True, opset_version=opset,
                                        dynamic_shapes=dynamic_shapes, verbose=False)
    except Exception as err:  # the exporter raises many types; all mean "does not trace"
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise TraceError(
            f"{type(model).__name__} could not be exported to ONNX (opset {opset}): {first}. "
            "Make forward traceable by torch.export: no data-dependent Python control flow, "
            "tensor inputs only"
        ) from err
    if program is None:
        raise TraceError(f"{type(model).__name__}: the ONNX exporter returned nothing")
    return program.model_proto


def _int8_bytes(model: nn.Module, inputs: tuple[Tensor, ...], dynamic_batch: bool, opset: int) -> bytes:
    """Export the dequantized float twin, then re-quantize it with onnxruntime, per channel."""
    import onnx
    from onnx import numpy_helper
    from onnxruntime.quantization import QuantType, quantize_dynamic

    twin = float_twin(model)
    proto = _export_proto(twin, inputs, dynamic_batch, opset)
    quantized = set(reference_weights(model)) - set(_float_weight_names(model))
    inits = {i.name: numpy_helper.to_array(i) for i in proto.graph.initializer}
    refs = {k: v for k, v in reference_weights(twin).items() if k in quantized}
    keep = {name for name, *_ in match_initializers(refs, inits).values()}
    chosen = [node.name for node in proto.graph.node if node.op_type in ("MatMul", "Gemm")
              and any(i in keep for i in node.input)]
    with tempfile.TemporaryDirectory() as tmp:
        src, dst = Path(tmp) / "float.onnx", Path(tmp) / "int8.onnx"
        onnx.save(proto, str(src))
        root = logging.getLogger()
        was, root.disabled = root.disabled, True  # onnxruntime logs a pre-processing hint at WARNING
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                quantize_dynamic(str(src), str(dst), per_channel=True, weight_type=QuantType.QInt8,
                                 op_types_to_quantize=["MatMul", "Gemm"], nodes_to_quantize=chosen,
                                 extra_options={"WeightSymmetric": True, "MatMulConstBOnly": True})
            finally:
                root.disabled = was
        return dst.read_bytes()


def _float_weight_names(model: nn.Module) -> list[str]:
    return [f"{fqn}.weight" for fqn, mod in model.named_modules()
            if not is_quantized_linear(mod) and isinstance(getattr(mod, "weight", None), Tensor)]


def __getattr__(name: str) -> Any:  # float_twin/is_int8 moved to onnx_check, export_command to cli (old path, warns)
    return moved_name(__name__, name)
