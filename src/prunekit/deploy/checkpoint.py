"""Pickle-free checkpoints whose size shrinks with sparsity: `save` and `load`.

The file is a plain safetensors file. A tensor with enough zeros is stored as two uint8
tensors instead of its raw bytes: its bitmask (which entries are non-zero) and its non-zero
values, each deflate-compressed; the values are byte-shuffled first (all first bytes, then
all second bytes, ...) because the sign/exponent bytes of trained weights repeat a lot while
the mantissa bytes do not. Decoding is exact. A JSON header in the safetensors metadata
says how each tensor is stored, so nothing is inferred from names and nothing is unpickled.
"""

from __future__ import annotations

import copy
import json
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, NonNegativeInt
from torch import Tensor, nn

from prunekit._moved import moved_name
from prunekit.core.masks import get_mask, set_mask
from prunekit.deploy.int8 import int8_state, load_int8_state
from prunekit.errors import CheckpointError
from prunekit.storage.files import atomic_path, validate_document
from prunekit.storage.safetensors import check_safetensors_layout
from prunekit.structured.llm import FORMAT as LLM_PLAN_FORMAT
from prunekit.structured.llm import replay_llm_plan
from prunekit.structured.lowrank import FORMAT as LOWRANK_PLAN_FORMAT
from prunekit.structured.lowrank import replay_lowrank_plan
from prunekit.structured.plan import replay

# a saved plan's "format" -> the function that replays it on a fresh dense model (ChannelPlan otherwise)
_REPLAYS = {LLM_PLAN_FORMAT: replay_llm_plan, LOWRANK_PLAN_FORMAT: replay_lowrank_plan}

FORMAT = "prunekit.sparse"
FORMAT_VERSION = 1
_META_KEY = "prunekit"
# Below this share of zeros a bitmask saves too little to give up a plain, mmap-able tensor.
MIN_SPARSITY_TO_ENCODE = 0.1
_DTYPES = {
    str(d).removeprefix("torch."): d
    for d in (torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int8)  # int8: INT8 weights
}


@dataclass(frozen=True)
class SaveReport:
    """What `save` wrote: where, how many bytes, and bytes per parameter."""

    path: Path
    size_bytes: int
    params: int
    dense_bytes: int

    @property
    def bytes_per_param(self) -> float:
        return self.size_bytes / max(self.params, 1)

    def __str__(self) -> str:
        return (
            f"{self.path}: {self.size_bytes:,} bytes for {self.params:,} params "
            f"({self.bytes_per_param:.3f} B/param, {self.size_bytes / max(self.dense_bytes, 1):.1%} of raw)"
        )


# --------------------------------------------------------------------------------------------
# The model's tensors as the user sees them: masked weights by their plain names.


def effective_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """`model.state_dict()` with prunekit's masks squashed: 'fc.weight' = original * mask.

    Keys under 'parametrizations.' of a masked tensor are replaced by the tensor they
    parametrize; other parametrizations (`weight_norm`'s original0/original1) keep their keys.
    """
    modules = dict(model.named_modules())
    out = {}
    for key, value in model.state_dict().items():
        head, sep, tail = key.partition("parametrizations.")
        name, _, rest = tail.partition(".")
        fqn = head.removesuffix(".")
        if not sep or fqn not in modules or get_mask(modules[fqn], name) is None:
            out[key] = value
        elif rest == "original":  # one entry per masked tensor; masks are implied by zeros
            out[f"{fqn}.{name}" if fqn else name] = getattr(modules[fqn], name).detach()
    return int8_state(model, out)  # INT8 layers: packed params -> plain int8 + scales


# --------------------------------------------------------------------------------------------
# Encoding.


def _shuffle_bytes(values: Tensor) -> bytes:
    raw = values.contiguous().view(torch.uint8).numpy().reshape(-1, values.element_size())
    return np.ascontiguousarray(raw.T).tobytes()


def _unshuffle_bytes(data: bytes, dtype: torch.dtype, count: int) -> Tensor:
    size = torch.empty((), dtype=dtype).element_size()
    if count == 0:
        return torch.empty(0, dtype=dtype)
    planes = np.frombuffer(data, dtype=np.uint8).reshape(size, count)
    return torch.from_numpy(np.ascontiguousarray(planes.T).reshape(-1).copy()).view(dtype)


def _encode(tensor: Tensor) -> tuple[dict[str, Tensor], dict[str, Any]] | None:
    """Bitmask + shuffled values, both deflated; None when raw storage is as small."""
    if tensor.dtype not in _DTYPES.values() or tensor.numel() < 64:
        return None
    flat = tensor.detach().cpu().reshape(-1)
    nonzero = flat != 0
    if 1.0 - float(nonzero.float().mean()) < MIN_SPARSITY_TO_ENCODE:
        return None
    mask_bytes = zlib.compress(np.packbits(nonzero.numpy()).tobytes(), 9)
    value_bytes = zlib.compress(_shuffle_bytes(flat[nonzero]), 9)
    if len(mask_bytes) + len(value_bytes) >= flat.numel() * flat.element_size():
        return None
    tensors = {
        "mask": torch.frombuffer(bytearray(mask_bytes), dtype=torch.uint8),
        "values": torch.frombuffer(bytearray(value_bytes), dtype=torch.uint8),
    }
    info = {"encoding": "bitmask-deflate", "shape": list(tensor.shape),
            "dtype": str(tensor.dtype).removeprefix("torch."), "nnz": int(nonzero.sum())}
    return tensors, info


def _inflate(data: Tensor, expected: int, what: str) -> bytes:
    # Bounded inflate: a hostile file cannot make us allocate more than the header promised.
    d = zlib.decompressobj()
    try:
        out = d.decompress(data.numpy().tobytes(), expected + 1)
    except zlib.error as err:
        raise CheckpointError(f"{what}: compressed data is corrupt ({err})") from None
    if len(out) != expected or d.unconsumed_tail or not d.eof:
        raise CheckpointError(f"{what}: decoded {len(out)} bytes, header promised {expected}")
    return out


def _decode(key: str, parts: dict[str, Tensor], info: dict[str, Any]) -> Tensor:
    try:
        shape, dtype, nnz = [int(s) for s in info["shape"]], _DTYPES[info["dtype"]], int(info["nnz"])
    except (KeyError, TypeError, ValueError):
        raise CheckpointError(f"tensor {key!r}: malformed header entry {info!r}") from None
    numel = int(np.prod(shape)) if shape else 1
    if not 0 <= nnz <= numel:
        raise CheckpointError(f"tensor {key!r}: nnz {nnz} outside [0, {numel}]")
    bits = np.unpackbits(np.frombuffer(_inflate(parts["mask"], (numel + 7) // 8, key), np.uint8))[:numel]
    nonzero = torch.from_numpy(bits.astype(bool))
    if int(nonzero.sum()) != nnz:
        raise CheckpointError(f"tensor {key!r}: mask has {int(nonzero.sum())} non-zeros, header says {nnz}")
    value_bytes = _inflate(parts["values"], nnz * torch.empty((), dtype=dtype).element_size(), key)
    values = _unshuffle_bytes(value_bytes, dtype, nnz)
    out = torch.zeros(numel, dtype=dtype)
    out[nonzero] = values
    return out.view(shape)


# --------------------------------------------------------------------------------------------
# Public API.


def save(
    model: nn.Module, path: str | Path, *, metadata: dict[str, Any] | None = None, plan: Any = None
) -> SaveReport:
    """Write `model`'s weights to a safetensors file, sparse tensors compressed; atomic.

    Masked (not yet finalized) models are saved as their effective weights. `metadata` is
    extra JSON-serialisable data stored in the header. `plan` is the structured plan the
    model was pruned with (or the list of them, in order, for iterative pruning): `load`
    replays it on a freshly built dense model.

    Example:
        >>> report = save(model, "out/model.safetensors")  # doctest: +SKIP
    """
    from safetensors.torch import save_file

    state = effective_state_dict(model)
    tensors: dict[str, Tensor] = {}
    header: dict[str, Any] = {"format": FORMAT, "version": FORMAT_VERSION, "encoded": {}, "aliases": {}}
    first_of: dict[tuple, str] = {}  # tied weights (one tensor under two names) are stored once
    for key, value in state.items():
        view = (value.untyped_storage().data_ptr(), value.storage_offset(), value.shape, value.stride(), value.dtype)
        if view in first_of:
            header["aliases"][key] = first_of[view]
            continue
        first_of[view] = key
        encoded = _encode(value)
        if encoded is None:
            tensors[key] = value.detach().cpu().contiguous()
        else:
            parts, info = encoded
            header["encoded"][key] = info
            for part, t in parts.items():
                tensors[f"{key}::{part}"] = t
    if isinstance(plan, (list, tuple)):  # plans applied in turn (iterative pruning): `load` replays each
        metadata = {**(metadata or {}), "channel_plans": [p.to_dict() for p in plan]}
    elif plan is not None:  # a structured plan (channels, LLM depth/width, low-rank): `load` replays it
        metadata = {**(metadata or {}), "channel_plan": plan.to_dict()}
    if metadata:
        header["user"] = metadata
    with atomic_path(path) as tmp:  # save_file streams each tensor to disk: no in-memory copy of the file
        save_file(tensors, tmp, metadata={_META_KEY: json.dumps(header)})
    path = Path(path)
    stored = [v for k, v in state.items() if k not in header["aliases"]]
    params = sum(v.numel() for v in stored)
    dense = sum(v.numel() * v.element_size() for v in stored)
    return SaveReport(path, path.stat().st_size, params, dense)


class _EncodedInfo(BaseModel):
    model_config = ConfigDict(extra="forbid")
    encoding: Literal["bitmask-deflate"]
    shape: list[NonNegativeInt]
    dtype: Literal[tuple(_DTYPES)]  # type: ignore[valid-type]
    nnz: NonNegativeInt


class _Header(BaseModel):
    """The prunekit JSON header inside the safetensors metadata (validated before decoding)."""

    format: str  # `read_checkpoint` checks format and version against FORMAT/FORMAT_VERSION first
    version: int
    encoded: dict[str, _EncodedInfo] = {}
    aliases: dict[str, str] = {}  # tied weights: name -> the name it is stored under
    user: dict[str, Any] = {}


def read_checkpoint(path: str | Path) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Decode a checkpoint into plain tensors and its user metadata, checking it throughout."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    check_safetensors_layout(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            raw = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(
            f"{str(path)!r} is not a valid safetensors file (corrupt, truncated, or another "
            f"format such as a pickle; prunekit never unpickles): {err}"
        ) from None
    try:
        header = json.loads(meta.get(_META_KEY, "{}"))
    except (json.JSONDecodeError, RecursionError):  # RecursionError: nesting deeper than Python's stack
        raise CheckpointError(f"{str(path)!r}: the prunekit header is not valid JSON") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{str(path)!r}: the prunekit header is not a JSON object")
    if header and (header.get("format") != FORMAT or header.get("version") != FORMAT_VERSION):
        raise CheckpointError(f"{str(path)!r}: unsupported format {header.get('format')!r} v{header.get('version')!r}")
    if header:
        header = validate_document(header, _Header, f"{str(path)!r} prunekit header", CheckpointError).model_dump()
    encoded = header.get("encoded", {})
    state = {k: v for k, v in raw.items() if "::" not in k}
    for key, info in encoded.items():
        parts = {p: raw.get(f"{key}::{p}") for p in ("mask", "values")}
        if any(v is None for v in parts.values()):
            raise CheckpointError(f"{str(path)!r}: tensor {key!r} is missing its encoded parts")
        state[key] = _decode(key, parts, info)  # type: ignore[arg-type]
    for alias, key in header.get("aliases", {}).items():
        if key not in state:
            raise CheckpointError(f"{str(path)!r}: tensor {alias!r} is tied to {key!r}, which the file lacks")
        state[alias] = state[key]
    return state, header.get("user", {})


def _check_fits(path: str | Path, state: dict[str, Tensor], model: nn.Module) -> None:
    """Raise `CheckpointError` unless `state` has exactly the model's keys, shapes and dtypes."""
    expected = effective_state_dict(model)
    missing, unexpected = expected.keys() - state.keys(), state.keys() - expected.keys()
    if missing or unexpected:
        raise CheckpointError(
            f"{str(path)!r} does not fit {type(model).__name__}: missing {sorted(missing)[:5]}, "
            f"unexpected {sorted(unexpected)[:5]}"
        )
    for key, value in state.items():
        want = expected[key]
        if value.shape != want.shape or value.dtype != want.dtype:
            raise CheckpointError(
                f"{str(path)!r}: tensor {key!r} is {tuple(value.shape)} {value.dtype}, "
                f"model expects {tuple(want.shape)} {want.dtype}"
            )


def _replay_all(plans: list[Any], model: nn.Module) -> nn.Module:
    for plan in plans:
        replay_plan = _REPLAYS.get(str(plan.get("format")) if isinstance(plan, dict) else "", replay)
        model = replay_plan(plan, model)
    return model


def load(path: str | Path, model: nn.Module | Callable[[], nn.Module]) -> nn.Module:
    """Load a `save`d checkpoint into `model` (mutates, returns); checked before any copy.

    Keys, shapes and dtypes must match the model exactly; otherwise `CheckpointError` names the
    tensor and the model is untouched. A masked model gets masks from the loaded zeros.
    `model` may be a build function. A checkpoint saved with `plan=` (structured pruning)
    is loaded into a freshly built dense model: the plan is replayed on it first.
    """
    state, user = read_checkpoint(path)
    given = isinstance(model, nn.Module)
    if not isinstance(model, nn.Module):
        model = model()  # a build function: a fresh dense model
    plans = user.get("channel_plans", [user["channel_plan"]] if "channel_plan" in user else [])
    if plans:  # structurally pruned: rebuild the shapes first (no pickle)
        if not isinstance(plans, list):
            raise CheckpointError(f"{path}: 'channel_plans' in the header is not a list")
        if given:  # replay on a copy and check that first: a refused load leaves `model` as it was
            _check_fits(path, state, _replay_all(plans, copy.deepcopy(model)))
        model = _replay_all(plans, model)
    _check_fits(path, state, model)
    modules = dict(model.named_modules())
    plain = {k: v for k, v in state.items() if not _is_masked(modules, k)}
    with torch.no_grad():
        plain = load_int8_state(model, plain)  # INT8 layers are set from int8 weights + scales
        # Keys were checked exactly above; strict=False only skips the masked tensors handled below.
        model.load_state_dict(plain, strict=False)
        for key, value in state.items():
            if _is_masked(modules, key):
                fqn, _, name = key.rpartition(".")
                module = modules[fqn]
                module.parametrizations[name].original.copy_(value)  # type: ignore[index, union-attr]
                set_mask(module, value != 0, name)
    return model


def _is_masked(modules: dict[str, nn.Module], key: str) -> bool:
    fqn, _, name = key.rpartition(".")
    module = modules.get(fqn)
    return module is not None and get_mask(module, name) is not None


def __getattr__(name: str) -> Any:  # the safetensors layout check moved to prunekit.storage.safetensors (warns)
    return moved_name(__name__, name)
