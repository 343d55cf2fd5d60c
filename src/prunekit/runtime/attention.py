"""prunekit's CPU attention (`kernels.attention`) as a torch op, and as a 🤗 transformers attention backend.

`attend(q, k, v, mask, scale)` is ``F.scaled_dot_product_attention`` for inference on CPU fp32:
no dropout, no causal flag (a causal mask passed as a tensor is fine), head dims a multiple of 16,
keys and values possibly fewer heads (grouped queries). It returns (B, H, Sq, D) as a view of a
(B, Sq, H, D) array, the layout a model merges its heads from. Under `torch.compile` it is one
opaque op (``prunekit::attention``), like the sparse Linears (`opaque`).

`use_in(model)` makes a transformers model on the SDPA backend run it through the library's
attention registry (`AttentionInterface`): every call it cannot take (training, causal, decoding
a few rows, another device or dtype) goes back to transformers' SDPA backend.
"""

from __future__ import annotations

import logging
import statistics
import time
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from prunekit.core.inputs import call_model
from prunekit.errors import UnsupportedLayerError
from prunekit.runtime.kernels.attention import ADD, KEEP, NONE, kernels, split
from prunekit.runtime.kernels.numba_setup import import_numba

log = logging.getLogger(__name__)

BACKEND = "prunekit"  # the name under transformers' AttentionInterface
_taken = [0]  # calls the backend gave to the kernel (eager only): `try_in` drops a backend that took none
MIN_QUERY_ROWS = 16  # fewer query rows (decoding) stay with torch: the kernel computes 8 rows at a time


def supports(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> bool:
    """Whether `attend` takes these inputs (the kernel's limits), without raising."""
    tensors = [q, k, v] + ([mask] if mask is not None else [])
    return (
        all(t.device.type == "cpu" for t in tensors)
        and all(t.dtype == torch.float32 for t in (q, k, v))
        and (mask is None or mask.dtype in (torch.float32, torch.bool))
        and q.dim() == 4 and k.dim() == 4 and v.shape == k.shape
        and q.shape[0] == k.shape[0] and q.shape[-1] == k.shape[-1] and q.shape[1] % k.shape[1] == 0
        and q.shape[-1] % 16 == 0 and 0 < q.shape[-1] <= 256
        and q.shape[2] >= MIN_QUERY_ROWS
        and not (torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)))
        and (mask is None or _broadcasts(mask.shape, (q.shape[0], q.shape[1], q.shape[2], k.shape[2])))
    )


def _broadcasts(shape: torch.Size, full: tuple[int, int, int, int]) -> bool:
    """Whether a mask of `shape` broadcasts to `full` (B, H, Sq, Sk) without growing it."""
    try:
        return len(shape) <= 4 and torch.broadcast_shapes(shape, full) == full
    except RuntimeError:
        return False


def _broadcast(mask: Tensor | None, shape: tuple[int, int, int, int]) -> tuple[np.ndarray, int]:
    """The mask as the kernel reads it, broadcast to (B, H, Sq, Sk) without copying, and its kind (`MASKS`)."""
    if mask is None:
        return np.zeros((1, 1, 1, 1), np.float32), NONE
    while mask.dim() < 4:
        mask = mask.unsqueeze(0)
    mask = mask.expand(shape)
    if mask.stride(-1) != 1:
        mask = mask.contiguous()
    if mask.dtype == torch.bool:
        return mask.view(torch.uint8).numpy(), KEEP
    return mask.numpy(), ADD


def _run(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, scale: float) -> Tensor:
    batch, heads, rows, dims = q.shape
    out = torch.empty(batch, rows, heads, dims)
    flat, kind = _broadcast(mask, (batch, heads, rows, k.shape[2]))
    strides = [t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v)]
    kernels(dims)(*(t.numpy() for t in strides), flat, kind, np.float32(scale), out.numpy(),
                  split(batch * heads, import_numba().get_num_threads()))  # numba's pool runs it
    return out.transpose(1, 2)


def _fake(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, scale: float) -> Tensor:
    return q.new_empty((q.shape[0], q.shape[2], q.shape[1], v.shape[-1])).transpose(1, 2)


_library = torch.library.Library("prunekit", "FRAGMENT")
_library.define("attention(Tensor q, Tensor k, Tensor v, Tensor? mask, float scale) -> Tensor")
_library.impl("attention", _run, "CPU")
torch.library.register_fake("prunekit::attention", _fake, lib=_library)


def attend(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None = None, scale: float | None = None) -> Tensor:
    """softmax(q k^T * scale + mask) v for inference: (B, H, Sq, D), as ``F.scaled_dot_product_attention``.

    `mask` is additive (fp32) or boolean (True: attend), broadcastable to (B, H, Sq, Sk); `scale`
    defaults to 1 / sqrt(D). Inputs `supports` rejects raise `UnsupportedLayerError`.
    """
    if not supports(q, k, v, mask):
        raise UnsupportedLayerError(
            f"prunekit attention takes CPU fp32 q, k, v of (B, H, S, D) with D a multiple of 16 (<= 256), "
            f">= {MIN_QUERY_ROWS} query rows and no gradient; got q {tuple(q.shape)} {q.dtype}, "
            f"k {tuple(k.shape)}, v {tuple(v.shape)}, mask {None if mask is None else (tuple(mask.shape), mask.dtype)}"
        )
    return _dispatch(q, k, v, mask, scale)


def _dispatch(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, scale: float | None) -> Tensor:
    """`attend` for inputs already checked: the op under `torch.compile`, the kernel directly otherwise."""
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    if torch.compiler.is_compiling():
        return torch.ops.prunekit.attention.default(q, k, v, mask, scale)
    return _run(q, k, v, mask, scale)


def _backend() -> Any:
    """A transformers attention function: `attend` where it applies, else transformers' own SDPA backend."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward as fallback

    def prunekit_attention(module: nn.Module, query: Tensor, key: Tensor, value: Tensor,
                           attention_mask: Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                           is_causal: bool | None = None, **kwargs: Any) -> tuple[Tensor, None]:
        causal = is_causal if is_causal is not None else getattr(module, "is_causal", False)
        plain = (dropout == 0.0 and not (causal and attention_mask is None)
                 and all(kwargs.get(name) is None for name in ("softcap", "position_bias", "sliding_window", "sinks"))
                 and not kwargs.get("output_attentions", False))
        if not (plain and supports(query, key, value, attention_mask)):
            return fallback(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                            is_causal=is_causal, **kwargs)
        if not torch.compiler.is_compiling():
            _taken[0] += 1
        out = _dispatch(query, key, value, attention_mask, scaling)  # `supports` said yes just above
        return out.transpose(1, 2), None  # (B, Sq, H, D): contiguous, as transformers' backends return it

    return prunekit_attention


def _mask(batch_size: int, q_length: int, kv_length: int, q_offset: int = 0, kv_offset: int = 0,
          mask_function: Any = None, attention_mask: Tensor | None = None, local_size: int | None = None,
          allow_is_bidirectional_skip: bool = False, **kwargs: Any) -> Tensor | None:
    """transformers' mask for this backend: SDPA's, except a plain padding mask stays (B, 1, 1, Sk).

    For an encoder the mask is the same for every query row; SDPA's builder spells it out as
    (B, 1, Sq, Sk), which under `torch.compile` (where it cannot skip an all-ones mask) cost
    0.1-0.25 ms a forward on MiniLM. The kernel reads the (B, 1, 1, Sk) one as it is.
    """
    from transformers.masking_utils import bidirectional_mask_function, prepare_padding_mask, sdpa_mask

    if mask_function is bidirectional_mask_function and local_size is None and q_offset == 0 and kv_offset == 0:
        padding = prepare_padding_mask(attention_mask, kv_length, kv_offset)
        if padding is None or (allow_is_bidirectional_skip and not torch.compiler.is_compiling()
                               and bool(padding.all())):
            return None
        return padding[:, None, None, :kv_length].bool()
    return sdpa_mask(batch_size=batch_size, q_length=q_length, kv_length=kv_length, q_offset=q_offset,
                     kv_offset=kv_offset, mask_function=mask_function, attention_mask=attention_mask,
                     local_size=local_size, allow_is_bidirectional_skip=allow_is_bidirectional_skip, **kwargs)


def use_in(model: nn.Module) -> str:
    """Make a transformers `model` attend with prunekit's kernel; returns its previous backend's name, to restore.

    Raises `UnsupportedLayerError` for a model that does not take registered attention backends.
    """
    previous = backend_of(model)
    if previous is None or not applies(model):
        raise UnsupportedLayerError(
            f"{type(model).__name__} (attention backend {previous!r}) does not take prunekit attention: it is for "
            "transformers models with _supports_attention_backend on the 'sdpa' backend"
        )
    if previous == BACKEND:
        return previous
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(BACKEND, _backend())
    AttentionMaskInterface.register(BACKEND, _mask)  # unregistered, transformers would build no mask at all
    set_backend(model, BACKEND)
    return previous


def set_backend(model: nn.Module, name: str) -> None:
    """Point `model` and its sub-configs at attention backend `name`."""
    setter = getattr(model, "set_attn_implementation", None)
    if setter is not None:
        setter(name)
    else:  # pragma: no cover - older transformers
        config: Any = model.config
        config._attn_implementation = name
    log.debug("attention backend of %s: %s", type(model).__name__, name)


def backend_of(model: nn.Module) -> str | None:
    """The transformers attention backend `model` is set to ("sdpa", "eager", ...), None for other models."""
    return getattr(getattr(model, "config", None), "_attn_implementation", None)


def applies(model: nn.Module) -> bool:
    """Whether `model` is a transformers model on the SDPA backend (the default) that takes registered backends.

    Only SDPA: the calls the kernel declines go to transformers' SDPA backend, with SDPA's masks (a
    model on "eager" builds additive masks and may want its attention weights back).
    """
    return backend_of(model) in ("sdpa", BACKEND) and bool(getattr(model, "_supports_attention_backend", False))


def try_in(model: nn.Module, inputs_by_batch: dict[int, Any], repeats: int, warmup: int) -> str:
    """Keep prunekit attention in `model` if whole forwards at every batch size are faster with it; says what it found.

    Where the kernel takes no call at these inputs (decoding one token, a causal flag), nothing is
    timed and the model keeps its backend. Otherwise the two backends take turns forward by
    forward (the order rotated each round); the verdict compares median ms per forward.
    """
    previous = use_in(model)
    _taken[0] = 0
    with torch.no_grad():
        for inputs in inputs_by_batch.values():
            call_model(model, inputs)
    if not _taken[0]:
        set_backend(model, previous)
        return f"{previous} ({BACKEND}'s kernel took none of the calls at these inputs: see attention.supports)"
    times: dict[str, dict[int, list[float]]] = {previous: {}, BACKEND: {}}
    order = [previous, BACKEND]
    with torch.no_grad():
        for batch, inputs in inputs_by_batch.items():
            for rep in range(warmup + repeats):
                for name in order[rep % 2:] + order[: rep % 2]:
                    set_backend(model, name)
                    start = time.perf_counter()
                    call_model(model, inputs)
                    if rep >= warmup:
                        times[name].setdefault(batch, []).append((time.perf_counter() - start) * 1e3)
    ms = {name: {b: statistics.median(t) for b, t in per.items()} for name, per in times.items()}
    faster = all(ms[BACKEND][b] < ms[previous][b] for b in inputs_by_batch)
    set_backend(model, BACKEND if faster else previous)
    timing = ", ".join(f"b{b} {ms[BACKEND][b]:.2f} vs {ms[previous][b]:.2f} ms" for b in inputs_by_batch)
    return f"{BACKEND if faster else previous} ({BACKEND} against {previous}, a forward: {timing})"
