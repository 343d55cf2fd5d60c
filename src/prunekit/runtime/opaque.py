"""prunekit's kernels as one opaque torch op, so `torch.compile` can take an accelerated model whole.

The installed layers run numpy and numba code that dynamo cannot trace (it fails on
``torch.from_numpy``). Under compilation each layer instead calls ``prunekit::linear_kernel``, a
torch library op whose fake implementation gives the output's shape. The graph keeps each kernel
as one node, and inductor fuses what lies between the kernels (LayerNorm, GELU, adds, attention's
reshapes) and drops the Python of the model's modules. Eager calls never go through the op:
dispatching to a Python implementation costs ~10 us a call, which decoding (~200 calls a token)
would feel.
"""

from __future__ import annotations

import itertools
import weakref
from typing import Protocol

import torch
from torch import Tensor


class Kernel(Protocol):
    """What the op calls: a layer's eager path and its output width."""

    out_features: int
    siblings: int  # > 1: the output is (siblings, *lead, out_features / siblings)

    def eager(self, x: Tensor) -> Tensor: ...


_kernels: weakref.WeakValueDictionary[int, Kernel] = weakref.WeakValueDictionary()
_handles = itertools.count()


def register(kernel: Kernel) -> int:
    """A new number under which the op finds `kernel` (the op holds no reference: the layer owns it).

    Layers register when built and again when copied or unpickled, so a copy never runs its
    original's weights.
    """
    handle = next(_handles)
    _kernels[handle] = kernel
    return handle


def _kernel(handle: int) -> Kernel:
    try:
        return _kernels[handle]
    except KeyError:
        raise RuntimeError(f"prunekit kernel {handle} no longer exists (its module was freed)") from None


def _run(x: Tensor, handle: int) -> Tensor:
    """``kernel(x)`` for the kernel registered under `handle`, in x's dtype, contiguous as the fake says.

    (The small-batch kernels hand back a transposed view; the op's output must match its fake's
    strides, so that is copied, a few hundred floats at the batch sizes it happens at.)
    """
    return _kernel(handle).eager(x).to(x.dtype).contiguous()


def _fake(x: Tensor, handle: int) -> Tensor:
    kernel = _kernel(handle)
    if kernel.siblings > 1:
        return x.new_empty((kernel.siblings, *x.shape[:-1], kernel.out_features // kernel.siblings))
    return x.new_empty((*x.shape[:-1], kernel.out_features))


# A plain library op, not `torch.library.custom_op`: its wrapper cost ~9 us more a call (measured
# here), ~0.2 ms a MiniLM forward.
_library = torch.library.Library("prunekit", "DEF")
_library.define("linear_kernel(Tensor x, int handle) -> Tensor")
_library.impl("linear_kernel", _run, "CPU")
torch.library.register_fake("prunekit::linear_kernel", _fake, lib=_library)
linear_kernel = torch.ops.prunekit.linear_kernel.default
