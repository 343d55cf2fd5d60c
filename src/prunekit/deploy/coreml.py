"""`export_coreml`: write a pruned model to a Core ML `.mlpackage` whose pruned weights stay sparse on disk.

The model is traced with `torch.export` and converted by coremltools to an ML program. Every
float weight with enough zeros is then re-encoded as `constexpr_sparse_to_dense` (a bitmask
plus the non-zeros) by `coremltools.optimize.coreml.prune_weights` with a threshold of 0, so
exactly the model's zeros become mask bits and no other value changes. (The converter's own
route, `_COREML_` buffers on the modules, zeroes every |w| <= fp16 epsilon as well.) With
`quantize=`, the non-zeros are then stored as INT8 or as indices into a k-means palette by
coremltools' joint compression (`linear_quantize_weights`/`palettize_weights` with
`joint_compression=True`): sparse + quantized, iOS18 ops.

Core ML cannot run on Linux, so the check (`coreml_check.check_coreml`) reads the written
package back and verifies, per pruned weight, the sparse op, its shape, its zero pattern and
non-zero count, and its values (up to a per-channel scale, for a BatchNorm folded into a conv;
within the quantization tolerance for INT8/palettized storage). A layer coremltools cannot
convert is named, with the op, from torch.export's `nn_module_stack`. The package is built in a
temporary folder beside the target and renamed into place.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import os
import re
import shutil
import tempfile
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn

from prunekit.core.masks import finalize, masked_modules
from prunekit.deploy.coreml_check import (
    SparseWeightCheck,
    check_coreml,
    min_sparsity,
    quiet_coremltools,
    require_coremltools,
)
from prunekit.deploy.onnx_check import is_int8
from prunekit.errors import ConfigError, PrunekitError, TraceError

__all__ = ["CoreMLReport", "SparseWeightCheck", "check_coreml", "export_coreml", "folder_size",
           "require_coremltools"]

log = logging.getLogger(__name__)

_TARGETS = ("iOS16", "iOS17", "iOS18")
_QUANTIZE = ("none", "int8", "lut8", "lut4")
# coremltools' messages for an op it has no converter for: (fx node name, op kind) or the op alone.
_UNSUPPORTED = (re.compile(r"Unsupported fx node ([\w.]+), kind ([\w.]+)"),
                re.compile(r"convert function for op '([\w.]+)' not implemented"))


@dataclass(frozen=True)
class CoreMLReport:
    """What `export_coreml` wrote: package sizes (sparse and dense) and the per-weight check."""

    path: Path
    size_bytes: int
    dense_size_bytes: int | None
    precision: str
    target: str
    sparse: bool
    tensors: tuple[SparseWeightCheck, ...] = ()
    quantize: str = "none"

    def summary(self) -> str:
        """The sizes, then one line per checked weight."""
        dense = (f", dense export {self.dense_size_bytes:,} bytes (ratio "
                 f"{self.size_bytes / self.dense_size_bytes:.3f})" if self.dense_size_bytes else "")
        weights = "" if self.quantize == "none" else f" weights {self.quantize}"
        lines = [f"{self.path}: {self.size_bytes:,} bytes{dense}, {self.precision}{weights}, {self.target}"]
        if self.tensors:
            lines.append(f"check passed: {len(self.tensors)} pruned weights stored sparse")
        lines += [f"  {t.name} <- {t.op_name} {t.shape} {t.nonzeros:,} non-zeros ({t.sparsity:.2%} sparse, "
                  f"{t.storage}, {t.values}, max error {t.max_error:.2g})" for t in self.tensors]
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.summary()


def export_coreml(
    model: nn.Module,
    path: str | Path,
    example_inputs: Any,
    *,
    precision: Literal["fp32", "fp16"] = "fp32",
    target: Literal["iOS16", "iOS17", "iOS18"] = "iOS18",
    sparse: bool = True,
    quantize: Literal["none", "int8", "lut8", "lut4"] = "none",
    check: bool = True,
    compare_dense: bool = True,
) -> CoreMLReport:
    """Export `model` to a Core ML `.mlpackage` at `path` with sparse weights, checked (does not mutate).

    Args:
        model: a dense, masked (exported as its effective weights) or finalized float model;
            switched to eval mode for the trace.
        path: the `.mlpackage` folder to write; an existing one is replaced.
        example_inputs: a tensor or tuple of tensors; their shapes become the model's fixed
            input shapes.
        precision: compute (and float weights) in float32 or float16 (`compute_precision`).
        target: minimum deployment target; iOS18 stores sparse weights in its newer op form.
        sparse: store each weight with enough zeros (above 1/32 sparsity in fp32, 1/16 in fp16:
            where the 1-bit mask pays) as a bitmask plus non-zeros. False writes a dense package.
        quantize: also store the weights' (non-zero) values quantized: "int8" (symmetric, one
            scale per output channel) or "lut8"/"lut4" (an 8/4-bit k-means palette per tensor).
            With `sparse`, this is coremltools' joint compression (sparse + INT8 or sparse +
            palette; needs target iOS18); "none" keeps them float.
        check: read the written package back and verify every pruned weight (see `check_coreml`).
        compare_dense: also convert a dense float package (not kept) to report its size.

    Returns:
        A `CoreMLReport` with the package size, the dense package's, and per-weight checks.

    Raises:
        PrunekitError: coremltools is not installed (names the extra), or `path` is unwritable.
        ConfigError: bad precision/target/quantize, or a quantized model.
        TraceError: the model does not trace with torch.export, or coremltools cannot convert
            it (an unsupported op is named with its layer).
        ExportCheckError: a pruned weight lost its sparse storage, zeros or values; nothing is
            written then.

    Example:
        >>> report = export_coreml(model, "out/model.mlpackage", torch.randn(1, 784), quantize="int8")  # doctest: +SKIP
        >>> print(report.summary())  # doctest: +SKIP
    """
    ct = require_coremltools()
    _validate(model, precision, target, quantize)
    path = Path(path)
    inputs = tuple(example_inputs) if isinstance(example_inputs, (tuple, list)) else (example_inputs,)
    program = _exported(model, inputs)
    with _staging(path) as staging:
        out = staging / path.name
        _compress(ct, _convert(ct, program, precision, target, sparse), quantize, sparse).save(str(out))
        checks = check_coreml(model, out) if check and sparse else ()
        dense_size = None
        if compare_dense:
            _convert(ct, program, precision, target, False).save(str(staging / "dense.mlpackage"))
            dense_size = folder_size(staging / "dense.mlpackage")
        size = folder_size(out)
        _move_into_place(out, path, staging)
    report = CoreMLReport(path, size, dense_size, precision, target, sparse, checks, quantize)
    log.info("%s", report.summary())
    return report


def _validate(model: nn.Module, precision: str, target: str, quantize: str) -> None:
    if precision not in ("fp32", "fp16"):
        raise ConfigError(f"export_coreml.precision: {precision!r} is not supported; use 'fp32' or 'fp16'")
    if target not in _TARGETS:
        raise ConfigError(f"export_coreml.target: {target!r} is not supported; use one of {', '.join(_TARGETS)}")
    if quantize not in _QUANTIZE:
        raise ConfigError(f"export_coreml.quantize: {quantize!r} is not supported; use one of "
                          f"{', '.join(_QUANTIZE)}")
    if quantize != "none" and target != "iOS18":
        raise ConfigError(f"export_coreml.quantize={quantize!r} needs target='iOS18' (sparse + quantized "
                          f"weights are iOS18 ops), got {target!r}")
    if is_int8(model):
        raise ConfigError(f"export_coreml: {type(model).__name__} is quantized; export the float model "
                          "and pass quantize='int8'")


def folder_size(path: str | Path) -> int:
    """Total bytes of the files under `path` (an `.mlpackage` is a folder)."""
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


# --------------------------------------------------------------------------------------------
# Converting.


def _exported(model: nn.Module, inputs: tuple[Tensor, ...]) -> Any:
    """`model` (a finalized copy if masked) traced by torch.export in the ATen dialect coremltools reads."""
    was_training = model.training
    model.eval()
    try:
        net = finalize(copy.deepcopy(model)) if masked_modules(model) else model
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return torch.export.export(net, inputs).run_decompositions({})
    except Exception as err:  # torch.export raises many types; all mean "does not trace"
        raise TraceError(f"{type(model).__name__} could not be traced by torch.export for Core ML: "
                         f"{_first_line(err)}. Make forward traceable: no data-dependent Python control "
                         "flow, tensor inputs only") from err
    finally:
        model.train(was_training)


def _convert(ct: Any, program: Any, precision: str, target: str, sparse: bool) -> Any:
    precision_enum = ct.precision.FLOAT32 if precision == "fp32" else ct.precision.FLOAT16
    try:
        with quiet_coremltools():
            mlmodel = ct.convert(program, convert_to="mlprogram", compute_precision=precision_enum,
                                 minimum_deployment_target=getattr(ct.target, target))
    except Exception as err:  # the converter raises many types; all mean "cannot convert"
        raise unsupported_op_error(program, err) from err
    if not sparse:
        return mlmodel
    # Threshold 0: only exact zeros become mask bits. Below 1/(8 * bytes) sparsity the 1-bit
    # mask costs more than the zeros it saves.
    config = ct.optimize.coreml.OptimizationConfig(global_config=ct.optimize.coreml.OpThresholdPrunerConfig(
        threshold=0.0, minimum_sparsity_percentile=min_sparsity(precision), weight_threshold=0))
    with quiet_coremltools():
        return ct.optimize.coreml.prune_weights(mlmodel, config)


def _compress(ct: Any, mlmodel: Any, quantize: str, joint: bool) -> Any:
    """`mlmodel` with its weights INT8 or palettized; on top of the sparse storage when `joint`."""
    if quantize == "none":
        return mlmodel
    opt = ct.optimize.coreml
    with quiet_coremltools():
        if quantize == "int8":
            op_config = opt.OpLinearQuantizerConfig(mode="linear_symmetric", dtype="int8",
                                                    granularity="per_channel", weight_threshold=0)
            return opt.linear_quantize_weights(mlmodel, opt.OptimizationConfig(global_config=op_config),
                                               joint_compression=joint)
        op_config = opt.OpPalettizerConfig(mode="kmeans", nbits=int(quantize.removeprefix("lut")),
                                           granularity="per_tensor", weight_threshold=0)
        return opt.palettize_weights(mlmodel, opt.OptimizationConfig(global_config=op_config),
                                     joint_compression=joint)


def unsupported_op_error(program: Any, err: BaseException) -> TraceError:
    """A `TraceError` for a failed `ct.convert`, naming the op and the torch layer that emitted it.

    coremltools names the fx node (or only the op); torch.export's `nn_module_stack` on that
    node gives the module path. Falls back to coremltools' first message line.
    """
    text = str(err)
    node_name = kind = None
    if found := _UNSUPPORTED[0].search(text):
        node_name, kind = found.groups()
    elif found := _UNSUPPORTED[1].search(text):
        kind = found.group(1)
    nodes = [n for n in program.graph.nodes if n.op == "call_function"] if kind else []
    node = next((n for n in nodes if n.name == node_name), None) or next(
        (n for n in nodes if str(n.target).split(".")[-2:-1] == [kind] or n.name == kind), None)
    if node is None:
        return TraceError(f"coremltools cannot convert this model: {_first_line(err)}. An unsupported op is "
                          "named in the message; exclude or rewrite that layer")
    stack = node.meta.get("nn_module_stack") or {}
    fqn, owner = list(stack.values())[-1] if stack else ("", "")
    owner = getattr(owner, "__name__", str(owner)).rpartition(".")[2]
    layer = f"layer {fqn!r} ({owner})" if fqn else f"the model's own forward ({owner or 'root'})"
    return TraceError(f"coremltools cannot convert op {kind!r} ({node.target}) in {layer}: {_first_line(err)}. "
                      "Rewrite that layer with ops Core ML supports, or replace it before export")


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


@contextlib.contextmanager
def _staging(path: Path) -> Iterator[Path]:
    """A temporary folder beside `path`, removed afterwards whatever happens."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    except OSError as err:
        raise PrunekitError(f"cannot write {str(path)!r}: {err.strerror}") from None
    try:
        yield staging
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _move_into_place(built: Path, path: Path, staging: Path) -> None:
    """Rename the finished package to `path`; a previous package is moved aside first, then deleted."""
    if path.exists():
        os.replace(path, staging / "previous")  # a folder cannot be renamed over a non-empty one
    os.replace(built, path)
