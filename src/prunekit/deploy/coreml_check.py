"""`check_coreml`: read a written `.mlpackage` back and verify its pruned weights, one by one.

Core ML cannot run on Linux, so nothing is predicted. Instead the package's MIL program and
weight file are loaded and every `constexpr_sparse_to_dense` op is read back as (bitmask,
non-zeros). Its non-zeros come straight from the weight file (sparse fp32/fp16), from a
`constexpr_sparse_blockwise_shift_scale` op (sparse + INT8: integers times a per-channel
scale) or from a `constexpr_lut_to_sparse` op (sparse + palettized: indices into a look-up
table); both are coremltools' joint compression, and are dequantized here the way Core ML does.
Each pruned weight of the model must then be held by one such op with its shape, exactly its
zeros, and its values: bit for bit for float storage; within half a quantization step (INT8)
or at the LUT entry nearest the model's value (palettized) for quantized storage. A conv whose
BatchNorm the converter folded in holds the model's weight times a per-channel factor, fitted
here; its values must then lie within 1e-3 of the channel's max (float), or, quantized, within
one INT8 step or one LUT entry of the scaled value, plus the fitted factor's uncertainty (a
coarse palette biases the fit; this check is looser than the one by name).
"""

from __future__ import annotations

import contextlib
import logging
import os
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
from torch import nn

from prunekit.core.extras import require
from prunekit.deploy.onnx_check import reference_weights
from prunekit.errors import ExportCheckError

SPARSE_OP = "constexpr_sparse_to_dense"  # one name for the iOS16 and the iOS18 form
_INT8_OP = "constexpr_sparse_blockwise_shift_scale"
_LUT_OP = "constexpr_lut_to_sparse"


def require_coremltools() -> Any:
    """Import coremltools, or raise an error naming the pip extra."""
    with quiet_coremltools():
        return require("coremltools", extra="coreml", what="Core ML export")


@contextlib.contextmanager
def quiet_coremltools() -> Iterator[None]:
    """Silence coremltools' import-time notices and per-pass progress bars (it logs at WARNING)."""
    root = logging.getLogger()
    was, root.disabled = root.disabled, True
    try:
        with warnings.catch_warnings(), open(os.devnull, "w") as null, contextlib.redirect_stderr(null):
            warnings.simplefilter("ignore")
            yield
    finally:
        root.disabled = was


def min_sparsity(precision: str) -> float:
    """Sparsity below which the 1-bit mask costs more than the zeros it saves (1/32 fp32, 1/16 fp16)."""
    return 1 / 32 if precision == "fp32" else 1 / 16


@dataclass(frozen=True)
class SparseWeightCheck:
    """One pruned weight as the package stores it.

    `storage` is "sparse" (bitmask + float non-zeros), "sparse+int8" or "sparse+lutN" (N-bit
    palette). `values` says how the stored non-zeros relate to the model's: "exact", "scaled"
    (one factor per output channel: a BatchNorm the converter folded in) or "quantized" (within
    the quantization tolerance). `max_error` is max |stored - model| / max |model| (0 if exact).
    """

    name: str
    op_name: str
    shape: tuple[int, ...]
    nonzeros: int
    sparsity: float
    values: Literal["exact", "scaled", "quantized"]
    storage: str = "sparse"
    max_error: float = 0.0


@dataclass(frozen=True)
class _Stored:
    """A sparse weight op read back: mask, dequantized non-zeros, and what bounds their error."""

    mask: np.ndarray  # bool, the weight's shape
    values: np.ndarray  # 1-D, one per mask bit
    storage: str
    step: np.ndarray | None = None  # INT8: the quantization step of each non-zero
    lut: np.ndarray | None = None  # palettized: the LUT per block, shape (*blocks, entries)


def check_coreml(model: nn.Module, package: str | Path) -> tuple[SparseWeightCheck, ...]:
    """Verify that every pruned weight of `model` is stored sparse in `package`, with its values (reads only).

    A weight counts as pruned when it has at least 1/32 zeros (1/16 for an fp16 package). For
    each one, a `constexpr_sparse_to_dense` op must hold it: found by name (torch.export's
    `p_<fqn>`) or else by its zero pattern (a conv whose BatchNorm the converter folded in is
    renamed), with the same shape, exactly the model's zeros and non-zero count, and the same
    non-zeros (up to a per-output-channel scale when a BatchNorm was folded in): exactly for
    float storage, within the quantization tolerance for sparse + INT8 or palettized storage.

    Returns:
        One `SparseWeightCheck` per pruned weight.

    Raises:
        ExportCheckError: the package cannot be read, or a pruned weight is not stored sparse,
            or lost or gained zeros, or changed; the message names the weight.
    """
    ops = _sparse_ops(package)
    dtype = next(iter(ops.values())).values.dtype if ops else np.dtype(np.float32)
    checks: list[SparseWeightCheck] = []
    claimed: set[str] = set()
    for key, ref in reference_weights(model).items():
        ref = ref.astype(dtype)
        sparsity = float((ref == 0).mean())
        if sparsity < min_sparsity("fp16" if dtype == np.float16 else "fp32"):
            continue
        name, by_name = _find_op(key, ref, ops, claimed)
        if name is None:
            raise ExportCheckError(f"weight {key!r} ({sparsity:.2%} sparse) is not stored sparse in "
                                   f"{str(package)!r}: no {SPARSE_OP} op holds it, so the package "
                                   "keeps it dense (was it exported with sparse=False?)")
        claimed.add(name)
        checks.append(_check_weight(key, ref, name, ops[name], scaled_ok=not by_name))
    return tuple(checks)


def _load_program(package: str | Path) -> Any:
    ct = require_coremltools()
    from coremltools.converters.mil.frontend.milproto.load import load as load_mil

    try:
        with quiet_coremltools():
            mlmodel = ct.models.MLModel(str(package), skip_model_load=True)
            spec = mlmodel.get_spec()
            return load_mil(spec, spec.specificationVersion, mlmodel.weights_dir)
    except Exception as err:  # a missing folder, a broken spec or weight file
        raise ExportCheckError(f"Core ML package {str(package)!r} cannot be read: {_first_line(err)}") from None


def _sparse_ops(package: str | Path) -> dict[str, _Stored]:
    """Op name -> what it stores, for every `constexpr_sparse_to_dense` op of the package."""
    out = {}
    for function in _load_program(package).functions.values():
        for op in function.operations:
            if op.op_type == SPARSE_OP:
                out[op.name] = _read_sparse_op(op)
    return out


def _read_sparse_op(op: Any) -> _Stored:
    shape = tuple(op.outputs[0].shape)
    source = op.nonzero_data.op
    if op.nonzero_data.val is not None:  # float non-zeros in the weight file
        mask = np.asarray(op.mask.val)
        if mask.ndim == 1 and mask.size != int(np.prod(shape)):  # iOS16 form: packed bits
            mask = np.unpackbits(mask.astype(np.uint8), bitorder="little")[: int(np.prod(shape))]
        return _Stored(mask.reshape(shape).astype(bool), np.asarray(op.nonzero_data.val).reshape(-1), "sparse")
    if source is None or source.op_type not in (_INT8_OP, _LUT_OP):
        raise ExportCheckError(f"Core ML op {op.name!r}: its non-zeros come from an op the check does not "
                               f"read ({getattr(source, 'op_type', None)!r})")
    values = np.asarray(source.materialized_val_inference()[1]).reshape(-1)
    if source.op_type == _INT8_OP:
        mask = np.asarray(source.data_mask.val).astype(bool)
        scale = np.abs(np.asarray(source.scale.val, dtype=np.float64))
        from coremltools.converters.mil.mil import types

        bits = types.builtin_to_string(source.nonzero_data.dtype)
        return _Stored(mask, values, f"sparse+{bits}", step=_expand(scale, shape)[mask])
    lut = np.asarray(source.lut.val, dtype=np.float64)
    if lut.shape[-1] != 1:
        raise ExportCheckError(f"Core ML op {op.name!r}: vector palettization is not checked")
    bits = int(np.log2(lut.shape[-2]))
    return _Stored(np.asarray(source.indices_mask.val).astype(bool), values, f"sparse+lut{bits}",
                   lut=lut[..., 0])


def _expand(blocks: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """A block-wise array (e.g. one scale per output channel) repeated out to `shape`."""
    for axis, (size, n) in enumerate(zip(shape, blocks.shape, strict=True)):
        blocks = np.repeat(blocks, size // n, axis=axis)
    return blocks


def _lut_distance(lut: np.ndarray, target: np.ndarray, neighbours: bool) -> np.ndarray:
    """Per element of `target`: the distance to the nearest entry of its block's LUT, or with
    `neighbours` to the farther of that entry's two neighbours (a target known only up to a
    fitted scale may be one entry off)."""
    out = np.empty(target.shape)
    sizes = [s // b for s, b in zip(target.shape, lut.shape[:-1], strict=True)]
    for index in np.ndindex(*lut.shape[:-1]):
        part = tuple(slice(i * s, (i + 1) * s) for i, s in zip(index, sizes, strict=True))
        entries, x = np.sort(lut[index]), target[part]
        right = np.searchsorted(entries, x).clip(1, max(entries.size - 1, 1))
        below, above = np.abs(x - entries[right - 1]), np.abs(x - entries[right])
        if not neighbours:
            out[part] = np.minimum(below, above)
            continue
        nearest = np.where(below <= above, right - 1, right)
        low, high = (nearest - 1).clip(0, entries.size - 1), (nearest + 1).clip(0, entries.size - 1)
        out[part] = np.maximum(np.abs(x - entries[low]), np.abs(x - entries[high]))
    return out


def _find_op(key: str, ref: np.ndarray, ops: dict[str, _Stored], claimed: set[str]) -> tuple[str | None, bool]:
    """(op name, found by name): by torch.export's `p_<fqn>`, else the unclaimed op with its zeros."""
    wanted = "p_" + key.replace(".", "_")
    for name in ops:
        if name.removesuffix("_sparsified").removesuffix("_to_fp16") == wanted:
            return name, True
    zeros = ref == 0
    return next((name for name, stored in ops.items() if name not in claimed
                 and stored.mask.shape == ref.shape and np.array_equal(~stored.mask, zeros)), None), False


def _check_weight(key: str, ref: np.ndarray, name: str, stored: _Stored, scaled_ok: bool) -> SparseWeightCheck:
    """Shape, zeros, non-zero count and values of one weight; a per-channel scale only if `scaled_ok`
    (an op found by its zeros: the converter renames a conv whose BatchNorm it folded in)."""
    where = f"weight {key!r} (Core ML op {name!r}, {stored.storage})"
    mask = stored.mask
    if mask.shape != ref.shape:
        raise ExportCheckError(f"{where}: shape {mask.shape} != PyTorch {ref.shape}")
    want, got = int((ref != 0).sum()), int(mask.sum())
    if want != got or stored.values.size != got or not np.array_equal(mask, ref != 0):
        raise ExportCheckError(f"{where}: {got} non-zeros in the mask ({stored.values.size} stored values) "
                               f"where PyTorch has {want}, or at other places: its zeros were not kept")
    r, values = ref.astype(np.float64), stored.values.astype(np.float64)
    quantized = stored.step is not None or stored.lut is not None
    kind: Literal["exact", "scaled", "quantized"] = "quantized" if quantized else "exact"
    error = _value_error(r, mask, values, stored, None)
    if error is None and scaled_ok:
        scale, spread = _channel_scale(r, mask, values)
        rows = np.abs(r).reshape(r.shape[0], -1).max(axis=1).reshape(scale.shape)
        error = _value_error(scale * r, mask, values, stored, (1e-3 * rows + 4 * spread * np.abs(r))[mask])
        kind = "scaled"
    if error is None:
        scale_note = " beyond a per-channel scale" if scaled_ok else ""
        bound = " beyond the quantization tolerance" if quantized else ""
        raise ExportCheckError(f"{where}: its non-zero values differ from PyTorch's{scale_note}{bound}")
    return SparseWeightCheck(key, name, tuple(ref.shape), got, 1 - got / ref.size, kind, stored.storage, error)


def _value_error(target: np.ndarray, mask: np.ndarray, values: np.ndarray, stored: _Stored,
                 fitted: np.ndarray | None) -> float | None:
    """max |stored - target| / max |target| if every stored non-zero is within its bound, else None.

    Bounds: 0 for float storage (bit for bit), half a step for INT8, the distance to the nearest
    LUT entry for a palette; plus fp16 rounding. A target scaled by a fitted per-channel factor
    (`fitted`: the fit's uncertainty per non-zero, which also covers the converter's fp16
    BatchNorm folding) may be one INT8 step or one LUT entry off, plus `fitted`.
    """
    kept = target[mask]
    err = np.abs(values - kept)
    scale = max(float(np.abs(kept).max(initial=0.0)), 1e-300)
    if stored.step is None and stored.lut is None and fitted is None:
        return 0.0 if np.array_equal(values, kept) else None
    allowed = np.zeros_like(kept)
    if stored.step is not None:
        allowed = 0.5 * stored.step if fitted is None else stored.step
    elif stored.lut is not None:
        allowed = _lut_distance(stored.lut, target, neighbours=fitted is not None)[mask]
    tol = allowed * (1 + 1e-3) + 2.0**-10 * np.abs(kept) + 1e-7 * scale
    if fitted is not None:
        tol = tol + fitted
    return float(err.max(initial=0.0) / scale) if bool((err <= tol).all()) else None


def _channel_scale(ref: np.ndarray, mask: np.ndarray, stored: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The least-squares factor per output channel from PyTorch's weight to the stored one, and its
    standard error (from the residuals: quantization noise makes it uncertain), both shaped to broadcast."""
    dense = np.zeros(ref.shape)
    dense[mask] = stored
    r, a = ref.reshape(ref.shape[0], -1), dense.reshape(ref.shape[0], -1)
    denom = np.maximum((r * r).sum(axis=1), 1e-300)
    scale = (a * r).sum(axis=1) / denom
    count = np.maximum(mask.reshape(ref.shape[0], -1).sum(axis=1) - 1, 1)
    spread = np.sqrt(((a - scale[:, None] * r) ** 2).sum(axis=1) / count / denom)
    shape = (-1,) + (1,) * (ref.ndim - 1)
    return scale.reshape(shape), spread.reshape(shape)


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__
