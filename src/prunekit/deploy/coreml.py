"""`export_coreml`: write a pruned model to a Core ML `.mlpackage` whose pruned weights stay sparse on disk.

The model is traced with `torch.export` and converted by coremltools to an ML program. Every
float weight with enough zeros is then re-encoded as `constexpr_sparse_to_dense` (a bitmask
plus the non-zeros) by `coremltools.optimize.coreml.prune_weights` with a threshold of 0, so
exactly the model's zeros become mask bits and no other value changes. (The converter's own
route, `_COREML_` buffers on the modules, zeroes every |w| <= fp16 epsilon as well.)

Core ML cannot run on Linux, so the check reads the written package back (its MIL program and
weight file) and verifies, per pruned weight, the sparse op, its shape, its zero pattern and
non-zero count, and its values (up to a per-channel scale, for a BatchNorm folded into a conv).
The package is built in a temporary folder beside the target and renamed into place.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import os
import shutil
import tempfile
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor, nn

from prunekit.core.masks import finalize, masked_modules
from prunekit.deploy.onnx_check import is_int8, reference_weights
from prunekit.errors import ConfigError, ExportCheckError, PrunekitError, TraceError

log = logging.getLogger(__name__)

_TARGETS = ("iOS16", "iOS17", "iOS18")
_SPARSE_OP = "constexpr_sparse_to_dense"  # one name for the iOS16 and the iOS18 form


def require_coremltools() -> Any:
    """Import coremltools, or raise an error naming the pip extra."""
    try:
        with _quiet():
            import coremltools
    except ImportError as err:
        raise PrunekitError(
            f"Core ML export needs coremltools ({err}); install with: pip install 'prunekit[coreml]'"
        ) from None
    return coremltools


@dataclass(frozen=True)
class SparseWeightCheck:
    """One pruned weight as the package stores it."""

    name: str
    op_name: str
    shape: tuple[int, ...]
    nonzeros: int
    sparsity: float
    values: Literal["exact", "scaled"]


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

    def summary(self) -> str:
        """The sizes, then one line per checked weight."""
        dense = (f", dense export {self.dense_size_bytes:,} bytes (ratio "
                 f"{self.size_bytes / self.dense_size_bytes:.3f})" if self.dense_size_bytes else "")
        lines = [f"{self.path}: {self.size_bytes:,} bytes{dense}, {self.precision}, {self.target}"]
        if self.tensors:
            lines.append(f"check passed: {len(self.tensors)} pruned weights stored sparse")
        lines += [f"  {t.name} <- {t.op_name} {t.shape} {t.nonzeros:,} non-zeros ({t.sparsity:.2%} sparse, "
                  f"{t.values})" for t in self.tensors]
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
        precision: weights and compute in float32 or float16 (`compute_precision`).
        target: minimum deployment target; iOS18 stores sparse weights in its newer op form.
        sparse: store each weight with enough zeros (above 1/32 sparsity in fp32, 1/16 in fp16:
            where the 1-bit mask pays) as a bitmask plus non-zeros. False writes a dense package.
        check: read the written package back and verify every pruned weight (see `check_coreml`).
        compare_dense: also convert a dense package (not kept) to report its size.

    Returns:
        A `CoreMLReport` with the package size, the dense package's, and per-weight checks.

    Raises:
        PrunekitError: coremltools is not installed (names the extra), or `path` is unwritable.
        ConfigError: bad precision/target, or a quantized model.
        TraceError: the model does not trace with torch.export or coremltools cannot convert it.
        ExportCheckError: a pruned weight lost its sparse storage, zeros or values; nothing is
            written then.

    Example:
        >>> report = export_coreml(model, "out/model.mlpackage", torch.randn(1, 784))  # doctest: +SKIP
        >>> print(report.summary())  # doctest: +SKIP
    """
    ct = require_coremltools()
    if precision not in ("fp32", "fp16"):
        raise ConfigError(f"export_coreml.precision: {precision!r} is not supported; use 'fp32' or 'fp16'")
    if target not in _TARGETS:
        raise ConfigError(f"export_coreml.target: {target!r} is not supported; use one of {', '.join(_TARGETS)}")
    if is_int8(model):
        raise ConfigError(f"export_coreml: {type(model).__name__} is quantized; export the float model")
    path = Path(path)
    inputs = tuple(example_inputs) if isinstance(example_inputs, (tuple, list)) else (example_inputs,)
    program = _exported(model, inputs)
    with _staging(path) as staging:
        out = staging / path.name
        _convert(ct, program, precision, target, sparse).save(str(out))
        checks = check_coreml(model, out) if check and sparse else ()
        dense_size = None
        if compare_dense:
            _convert(ct, program, precision, target, False).save(str(staging / "dense.mlpackage"))
            dense_size = folder_size(staging / "dense.mlpackage")
        size = folder_size(out)
        _move_into_place(out, path, staging)
    report = CoreMLReport(path, size, dense_size, precision, target, sparse, checks)
    log.info("%s", report.summary())
    return report


def folder_size(path: str | Path) -> int:
    """Total bytes of the files under `path` (an `.mlpackage` is a folder)."""
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


# --------------------------------------------------------------------------------------------
# Converting.


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silence coremltools' import-time notices and per-pass progress bars (it logs at WARNING)."""
    root = logging.getLogger()
    was, root.disabled = root.disabled, True
    try:
        with warnings.catch_warnings(), open(os.devnull, "w") as null, contextlib.redirect_stderr(null):
            warnings.simplefilter("ignore")
            yield
    finally:
        root.disabled = was


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
        with _quiet():
            mlmodel = ct.convert(program, convert_to="mlprogram", compute_precision=precision_enum,
                                 minimum_deployment_target=getattr(ct.target, target))
    except Exception as err:  # the converter raises many types; all mean "cannot convert"
        raise TraceError(f"coremltools cannot convert this model: {_first_line(err)}. An unsupported "
                         "op is named in the message; exclude or rewrite that layer") from err
    if not sparse:
        return mlmodel
    # Threshold 0: only exact zeros become mask bits. Below 1/(8 * bytes) sparsity the 1-bit
    # mask costs more than the zeros it saves.
    config = ct.optimize.coreml.OptimizationConfig(global_config=ct.optimize.coreml.OpThresholdPrunerConfig(
        threshold=0.0, minimum_sparsity_percentile=_min_sparsity(precision), weight_threshold=0))
    with _quiet():
        return ct.optimize.coreml.prune_weights(mlmodel, config)


def _min_sparsity(precision: str) -> float:
    return 1 / 32 if precision == "fp32" else 1 / 16


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


# --------------------------------------------------------------------------------------------
# Checking a written package.


def check_coreml(model: nn.Module, package: str | Path) -> tuple[SparseWeightCheck, ...]:
    """Verify that every pruned weight of `model` is stored sparse in `package`, unchanged.

    A weight counts as pruned when it has at least 1/32 zeros (1/16 for an fp16 package). For
    each one, a `constexpr_sparse_to_dense` op must hold it: found by name (torch.export's
    `p_<fqn>`) or else by its zero pattern (a conv whose BatchNorm the converter folded in is
    renamed), with the same shape, exactly the model's zeros and non-zero count, and the same
    non-zeros (up to a per-output-channel scale when a BatchNorm was folded in).

    Returns:
        One `SparseWeightCheck` per pruned weight.

    Raises:
        ExportCheckError: the package cannot be read, or a pruned weight is not stored sparse,
            or lost or gained zeros, or changed; the message names the weight.
    """
    ops = _sparse_ops(package)
    dtype = next(iter(ops.values()))[1].dtype if ops else np.dtype(np.float32)
    checks: list[SparseWeightCheck] = []
    claimed: set[str] = set()
    for key, ref in reference_weights(model).items():
        ref = ref.astype(dtype)
        sparsity = float((ref == 0).mean())
        if sparsity < _min_sparsity("fp16" if dtype == np.float16 else "fp32"):
            continue
        name, by_name = _find_op(key, ref, ops, claimed)
        if name is None:
            raise ExportCheckError(f"weight {key!r} ({sparsity:.2%} sparse) is not stored sparse in "
                                   f"{str(package)!r}: no {_SPARSE_OP} op holds it, so the package "
                                   "keeps it dense (was it exported with sparse=False?)")
        claimed.add(name)
        checks.append(_check_weight(key, ref, name, *ops[name], scaled_ok=not by_name))
    return tuple(checks)


def _sparse_ops(package: str | Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Op name -> (mask as bool array of the weight's shape, non-zeros) of every sparse weight op."""
    ct = require_coremltools()
    from coremltools.converters.mil.frontend.milproto.load import load as load_mil

    try:
        with _quiet():
            mlmodel = ct.models.MLModel(str(package), skip_model_load=True)
            spec = mlmodel.get_spec()
            program = load_mil(spec, spec.specificationVersion, mlmodel.weights_dir)
    except Exception as err:  # a missing folder, a broken spec or weight file
        raise ExportCheckError(f"Core ML package {str(package)!r} cannot be read: {_first_line(err)}") from None
    out = {}
    for function in program.functions.values():
        for op in function.operations:
            if op.op_type == _SPARSE_OP:
                mask = np.asarray(op.mask.val)
                shape = tuple(op.outputs[0].shape)
                if mask.ndim == 1 and mask.size != int(np.prod(shape)):  # iOS16 form: packed bits
                    mask = np.unpackbits(mask.astype(np.uint8), bitorder="little")[: int(np.prod(shape))]
                out[op.name] = (mask.reshape(shape).astype(bool), np.asarray(op.nonzero_data.val).reshape(-1))
    return out


def _find_op(key: str, ref: np.ndarray, ops: dict[str, tuple[np.ndarray, np.ndarray]],
             claimed: set[str]) -> tuple[str | None, bool]:
    """(op name, found by name): by torch.export's `p_<fqn>`, else the unclaimed op with its zeros."""
    wanted = "p_" + key.replace(".", "_")
    for name in ops:
        if name.removesuffix("_sparsified").removesuffix("_to_fp16") == wanted:
            return name, True
    zeros = ref == 0
    return next((name for name, (mask, _) in ops.items() if name not in claimed
                 and mask.shape == ref.shape and np.array_equal(~mask, zeros)), None), False


def _check_weight(key: str, ref: np.ndarray, name: str, mask: np.ndarray, values: np.ndarray,
                  scaled_ok: bool) -> SparseWeightCheck:
    """Shape, zeros, non-zero count and values of one weight; a per-channel scale only if `scaled_ok`
    (an op found by its zeros: the converter renames a conv whose BatchNorm it folded in)."""
    where = f"weight {key!r} (Core ML op {name!r})"
    if mask.shape != ref.shape:
        raise ExportCheckError(f"{where}: shape {mask.shape} != PyTorch {ref.shape}")
    want, got = int((ref != 0).sum()), int(mask.sum())
    if want != got or values.size != got or not np.array_equal(mask, ref != 0):
        raise ExportCheckError(f"{where}: {got} non-zeros in the mask ({values.size} stored values) "
                               f"where PyTorch has {want}, or at other places: its zeros were not kept")
    kept = ref[mask].astype(np.float64)
    stored = values.astype(np.float64)
    if np.array_equal(stored, kept):
        kind: Literal["exact", "scaled"] = "exact"
    elif scaled_ok and _scaled(ref.astype(np.float64), mask, stored):
        kind = "scaled"
    else:
        scale = " beyond a per-channel scale" if scaled_ok else ""
        raise ExportCheckError(f"{where}: its non-zero values differ from PyTorch's{scale}")
    return SparseWeightCheck(key, name, tuple(ref.shape), got, 1 - got / ref.size, kind)


def _scaled(ref: np.ndarray, mask: np.ndarray, stored: np.ndarray) -> bool:
    """True if the stored non-zeros are one scale per output channel times PyTorch's (rtol 1e-3)."""
    dense = np.zeros(ref.shape)
    dense[mask] = stored
    r, a = ref.reshape(ref.shape[0], -1), dense.reshape(ref.shape[0], -1)
    denom = (r * r).sum(axis=1)
    scale = np.where(denom > 0, (a * r).sum(axis=1) / np.maximum(denom, 1e-300), 0.0)
    tol = 1e-3 * np.abs(a).max(axis=1, initial=0.0) + 1e-7
    return bool((np.abs(a - scale[:, None] * r) <= tol[:, None]).all())
