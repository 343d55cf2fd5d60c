"""Which ONNX initializer holds which PyTorch tensor, though exporters rename, transpose and fold.

Matched in this order: by name (also with the `_Transposed`/`_quantized` suffixes onnxruntime's
quantizer adds), by exact value (directly or transposed), by zero pattern, by a per-output-channel
scale (a folded BatchNorm, or int8 with per-channel scales), and last by a shape no other
initializer has. Sparse initializers (`SparseTensorProto`) are densified first; malformed indices
fail naming the tensor. `onnx_check` uses this to check what pruning bought survived the export.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from prunekit.errors import ExportCheckError

_SUFFIXES = ("_quantized", "_Transposed")  # what onnxruntime's quantizer appends to a weight's name


def initializer_arrays(proto: Any) -> dict[str, np.ndarray]:
    """Name -> array of every initializer of `proto`, dense ones and densified sparse ones."""
    from onnx import numpy_helper

    out = {i.name: numpy_helper.to_array(i) for i in proto.graph.initializer}
    out.update({s.values.name: densify_sparse(s) for s in proto.graph.sparse_initializer})
    return out


def densify_sparse(sparse: Any) -> np.ndarray:
    """The dense array an ONNX `SparseTensorProto` stands for (COO, linear or [NNZ, rank] indices).

    Raises:
        ExportCheckError: the indices are out of range, not ascending, or do not match the
            values; the message names the tensor.
    """
    from onnx import numpy_helper

    name, shape = sparse.values.name, tuple(int(d) for d in sparse.dims)
    values = numpy_helper.to_array(sparse.values).reshape(-1)
    indices = numpy_helper.to_array(sparse.indices).astype(np.int64)
    size = int(np.prod(shape))
    if indices.ndim == 2 and indices.shape[1] == len(shape) and (indices >= 0).all() \
            and (indices < np.array(shape)).all():
        indices = np.ravel_multi_index(tuple(indices.T), shape) if indices.size else indices.reshape(-1)
    flat = indices.reshape(-1) if indices.ndim == 1 else None
    if flat is None or flat.size != values.size or (flat.size and (flat.min() < 0 or flat.max() >= size)) \
            or (np.diff(flat) <= 0).any():
        raise ExportCheckError(f"sparse initializer {name!r}: its {values.size} values and indices of shape "
                               f"{tuple(indices.shape)} do not describe a tensor of shape {shape} "
                               "(indices must be in range, ascending, one per value)")
    dense = np.zeros(size, dtype=values.dtype)
    dense[flat] = values
    return dense.reshape(shape)


def _orientations(ref: np.ndarray, arr: np.ndarray, name: str) -> list[tuple[np.ndarray, str]]:
    """`arr` viewed in PyTorch layout: as is and/or transposed (a 2-D MatMul weight)."""
    out = []
    if arr.shape == ref.shape:
        out.append((arr, "same"))
    if arr.ndim == 2 and arr.T.shape == ref.shape:
        out.append((arr.T, "transposed"))
    return out[::-1] if "_Transposed" in name else out


def _scaled_fit(ref: np.ndarray, arr: np.ndarray, integer: bool) -> bool:
    """True if `arr` = per-output-channel scale * `ref` (within rounding, one step for int8)."""
    r, a = ref.reshape(ref.shape[0], -1), arr.reshape(arr.shape[0], -1)
    denom = (r * r).sum(axis=1)
    scale = np.where(denom > 0, (a * r).sum(axis=1) / np.maximum(denom, 1e-300), 0.0)
    residual = np.abs(a - scale[:, None] * r)
    if integer:
        return bool((residual <= 1.0 + 1e-6).all())
    tol = 1e-5 * np.abs(a).max(axis=1, initial=0.0) + 1e-7
    return bool((residual <= tol[:, None]).all())


def values_match(ref: np.ndarray, arr: np.ndarray, integer: bool) -> str | None:
    """How `arr` holds `ref`'s values: "exact", "scaled" (one factor per output row), or None."""
    if not integer and np.allclose(arr, ref, rtol=1e-6, atol=1e-8):
        return "exact"
    if _scaled_fit(ref, arr, integer):
        return "scaled"
    return None


def _strip(name: str) -> str:
    changed = True
    while changed:
        changed = False
        for suffix in _SUFFIXES:
            if name.endswith(suffix):
                name, changed = name.removesuffix(suffix), True
    return name


def match_initializers(
    refs: dict[str, np.ndarray], inits: dict[str, np.ndarray]
) -> dict[str, tuple[str, np.ndarray, str]]:
    """PyTorch FQN -> (initializer name, array in PyTorch layout, layout) for each found tensor."""
    weights = {n: a.astype(np.float64) for n, a in inits.items() if a.dtype.kind in "fi" and a.ndim >= 2}
    integer = {n for n, a in inits.items() if a.dtype.kind == "i"}
    rules = (
        lambda key, name, arr: _strip(name) == key,
        lambda key, name, arr: np.array_equal(arr, refs[key]),
        lambda key, name, arr: bool((refs[key] == 0).any()) and np.array_equal(arr == 0, refs[key] == 0),
        lambda key, name, arr: _scaled_fit(refs[key], arr, name in integer),
    )
    found: dict[str, tuple[str, np.ndarray, str]] = {}
    claimed: set[str] = set()
    for index, rule in enumerate(rules):
        for key in refs:
            if key in found:
                continue
            # An exporter may share one initializer between equal tensors, so a name match
            # may reuse a claimed initializer; the value-based rules may not.
            match = next(
                ((name, arr, layout) for name, full in weights.items() if index == 0 or name not in claimed
                 for arr, layout in _orientations(refs[key], full, name) if rule(key, name, arr)),
                None,
            )
            if match is not None:
                found[key] = match
                claimed.add(match[0])
    # Last resort: the only unclaimed initializer of a compatible shape, so that a damaged
    # tensor is still found and then fails its checks by name instead of "not found".
    for key in refs:
        if key not in found:
            fits = [(n, o) for n, a in weights.items() if n not in claimed
                    for o in _orientations(refs[key], a, n)[:1]]
            if len(fits) == 1:
                found[key] = (fits[0][0], *fits[0][1])
                claimed.add(fits[0][0])
    return found
