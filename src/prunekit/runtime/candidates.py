"""The implementations `accelerate` chooses between for one nn.Linear, each a small nn.Module.

Every candidate is built from the layer's effective weight (masks applied) and bias, takes any
leading batch dimensions like `nn.Linear`, and is inference-only. A registry keyed by name
(`CANDIDATES`) says which candidates exist; a builder returns None where its candidate does not
apply to a layer (e.g. BSR without a block structure, INT8 when not allowed).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from prunekit._registry import Registry
from prunekit.errors import UnsupportedLayerError
from prunekit.runtime import formats, opaque
from prunekit.runtime.kernels import avx512, bind, spmm_vnni


@dataclass(frozen=True)
class LayerInfo:
    """What a builder may look at: the effective weight and bias, the block found, and options."""

    fqn: str
    weight: Tensor
    bias: Tensor | None
    block: tuple[int, int] | None
    nm24: bool
    allow_int8: bool
    siblings: int = 1  # stacked layers of equal width: a kernel may return each one's outputs contiguous


Builder = Callable[[LayerInfo], nn.Module | None]
CANDIDATES: Registry[str, Builder] = Registry("candidate")


def register_candidate(name: str) -> Callable[[Builder], Builder]:
    """Decorator: add a candidate builder under `name` to `CANDIDATES` (mutates it; a taken name is a `ConfigError`)."""
    return CANDIDATES.decorator(name)


def get_candidate(name: str) -> Builder:
    """The builder registered as `name`; a `ConfigError` naming the known candidates if there is none."""
    return CANDIDATES.get(name)


def list_candidates() -> list[str]:
    """The registered candidates' names, sorted."""
    return CANDIDATES.names()


def is_int8_candidate(name: str) -> bool:
    """Whether candidate `name` computes in INT8 (its outputs then differ from dense by ~1 %)."""
    return "int8" in name


class _Flat(nn.Module):
    """Shared plumbing: flatten leading dims to rows, run `_rows`, restore them.

    Under `torch.compile` the layer is one opaque op (`opaque`) unless `traceable`, so compiling
    an accelerated model keeps prunekit's kernels and compiles what lies between them.
    """

    traceable = False  # True where dynamo can trace `eager` itself (plain torch ops)
    siblings = 1  # > 1: outputs come back as (siblings, *lead, out / siblings), one contiguous array each

    def __init__(self, fqn: str, in_features: int, out_features: int) -> None:
        super().__init__()
        self.fqn, self.in_features, self.out_features = fqn, in_features, out_features
        self._handle = opaque.register(self)

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        self._handle = opaque.register(self)  # a copy runs its own weights under compile

    def _rows(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    def _check(self, x: Tensor) -> None:
        if x.shape[-1] != self.in_features:
            raise UnsupportedLayerError(
                f"layer {self.fqn!r}: expected {self.in_features} input features, got shape {tuple(x.shape)}"
            )
        if x.requires_grad and torch.is_grad_enabled():
            raise UnsupportedLayerError(
                f"layer {self.fqn!r} was replaced by an inference-only kernel by prunekit.accelerate; "
                "run it under torch.no_grad() or accelerate a copy for training"
            )

    def forward(self, x: Tensor) -> Tensor:
        if torch.compiler.is_compiling() and not self.traceable:
            self._check(x)
            return opaque.linear_kernel(x, self._handle)
        return self.eager(x)

    def eager(self, x: Tensor) -> Tensor:
        """The layer's own computation, outside compilation."""
        self._check(x)
        lead = x.shape[:-1]
        y = self._rows(x.reshape(-1, self.in_features))
        return y.reshape(*lead, self.out_features)

    def extra_repr(self) -> str:
        return f"{self.fqn!r}, in_features={self.in_features}, out_features={self.out_features}"


class NumbaSparseLinear(_Flat):
    """prunekit's own kernel (`kernels.bind`: numba, or AVX-512 for ``nm24r``) on a `formats.PackedWeight`.

    With `many_rows`, batches above 8 rows run the rows-as-lanes kernel (`kernels.spmm`; for an int8
    1 x 4 ``bsr`` weight `kernels.spmm_vnni`, which quantizes x as well).
    """

    bias: Tensor

    def __init__(
        self, fqn: str, packed: formats.PackedWeight, bias: Tensor | None, parallel: bool = True,
        many_rows: bool = False, siblings: int = 1,
    ) -> None:
        super().__init__(fqn, packed.shape[1], packed.shape[0])
        self.packed, self.parallel, self.many_rows, self.siblings = packed, parallel, many_rows, siblings
        b = torch.zeros(packed.shape[0]) if bias is None else bias.detach().float().clone()
        self.register_buffer("bias", b.contiguous())
        self._bind()

    def _bind(self) -> None:
        many_rows = getattr(self, "many_rows", False)  # absent from modules pickled before it existed
        self._run = bind(self.packed, self.bias.numpy(), parallel=self.parallel, many_rows=many_rows,
                         siblings=self.siblings)

    def __getstate__(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k != "_run"}  # a closure: rebuilt on load

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        self._bind()

    def eager(self, x: Tensor) -> Tensor:
        # Decoding calls this ~200 times a token and every torch op costs ~1 us, so reshapes happen
        # on numpy views and nothing is converted that is already float32 and contiguous.
        self._check(x)
        x32 = x if x.dtype is torch.float32 and x.is_contiguous() else x.to(torch.float32).contiguous()
        y = self._run(x32.numpy().reshape(-1, self.in_features))
        shape = x.shape[:-1] + (self.out_features,)
        out = torch.from_numpy(y.reshape(shape if self.siblings == 1 else (self.siblings, *shape[:-1], -1)))
        return out if x.dtype is torch.float32 else out.to(x.dtype)

    def extra_repr(self) -> str:
        threads = "parallel" if self.parallel else "1 thread"
        rows = ", many-row kernel" if getattr(self, "many_rows", False) else ""
        rows += " (x quantized, VNNI)" if rows and self.packed.kind == "bsr" else ""
        return f"{super().extra_repr()}, format={self.packed.describe()}, {threads}{rows}"


class TorchSparseLinear(_Flat):
    """torch's own sparse CSR or BSR matmul: y.T = W @ x.T (+ bias)."""

    def __init__(self, fqn: str, weight: Tensor, bias: Tensor | None, block: tuple[int, int] | None) -> None:
        super().__init__(fqn, weight.shape[1], weight.shape[0])
        w = weight.detach().float()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "sparse CSR support is in beta"
            self.weight = w.to_sparse_bsr(block) if block else w.to_sparse_csr()
        self.bias = None if bias is None else bias.detach().float().clone()

    def _rows(self, x: Tensor) -> Tensor:
        y = torch.sparse.mm(self.weight, x.t()).t()
        return y if self.bias is None else y + self.bias


class OneDnnLinear(_Flat):
    """Dense oneDNN (mkldnn) linear with the weight pre-packed in oneDNN's layout."""

    def __init__(self, fqn: str, weight: Tensor, bias: Tensor | None) -> None:
        super().__init__(fqn, weight.shape[1], weight.shape[0])
        self.weight = weight.detach().float().contiguous().to_mkldnn()
        b = torch.zeros(weight.shape[0]) if bias is None else bias.detach().float()
        self.bias = b.contiguous().to_mkldnn()

    def _rows(self, x: Tensor) -> Tensor:
        return torch._C._nn.mkldnn_linear(x.float().contiguous().to_mkldnn(), self.weight, self.bias).to_dense()


class DenseLinear(_Flat):
    """Plain `F.linear` on the effective weight (the dense baseline, masks baked in)."""

    traceable = True
    weight: Tensor
    bias: Tensor | None

    def __init__(self, fqn: str, weight: Tensor, bias: Tensor | None) -> None:
        super().__init__(fqn, weight.shape[1], weight.shape[0])
        self.register_buffer("weight", weight.detach().clone())
        self.register_buffer("bias", None if bias is None else bias.detach().clone())

    def _rows(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight, self.bias)


def _dynamic_int8(fqn: str, weight: Tensor, bias: Tensor | None) -> nn.Module:
    from torch.ao.nn.quantized.dynamic import Linear as QLinear

    w = weight.detach().float()
    scales = (w.abs().amax(dim=1) / 127.0).clamp_min(1e-12).double()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao's deprecation notices
        qw = torch.quantize_per_channel(w, scales, torch.zeros_like(scales, dtype=torch.long), 0, torch.qint8)
        q = QLinear(w.shape[1], w.shape[0], bias_=bias is not None, dtype=torch.qint8)
        q.set_weight_bias(qw, None if bias is None else bias.detach().float())
    return q


@register_candidate("dense")
def _dense(info: LayerInfo) -> nn.Module:
    return DenseLinear(info.fqn, info.weight, info.bias)


@register_candidate("onednn")
def _onednn(info: LayerInfo) -> nn.Module | None:
    if not torch.backends.mkldnn.is_available():
        return None
    return OneDnnLinear(info.fqn, info.weight, info.bias)


@register_candidate("torch_csr")
def _torch_csr(info: LayerInfo) -> nn.Module:
    return TorchSparseLinear(info.fqn, info.weight, info.bias, None)


@register_candidate("torch_bsr")
def _torch_bsr(info: LayerInfo) -> nn.Module | None:
    # torch's CPU BSR matmul goes through MKL sparse, which takes square blocks only.
    if info.block is None or info.block[0] != info.block[1]:
        return None
    return TorchSparseLinear(info.fqn, info.weight, info.bias, info.block)


@register_candidate("dense_int8")
def _dense_int8(info: LayerInfo) -> nn.Module | None:
    return _dynamic_int8(info.fqn, info.weight, info.bias) if info.allow_int8 else None


def _pack(info: LayerInfo, kind: str, int8: bool) -> formats.PackedWeight | None:
    if int8 and not info.allow_int8:
        return None
    if kind == "csr":
        return formats.pack_csr(info.weight, int8=int8)
    if kind == "bsr":
        return formats.pack_bsr(info.weight, info.block, int8=int8) if info.block else None
    if kind == "nm24r":
        fits = info.nm24 and int8 and info.weight.shape[0] % formats.ROW_LANES == 0 and avx512.available()
        return formats.pack_nm24_rows(info.weight) if fits else None
    return formats.pack_nm24(info.weight, int8=int8) if info.nm24 else None


def _register_numba(kind: str, int8: bool, parallel: bool) -> None:
    name = f"numba_{kind}{'_int8' if int8 else ''}{'' if parallel else '_1t'}"

    @register_candidate(name)
    def build(info: LayerInfo) -> nn.Module | None:
        packed = _pack(info, kind, int8)
        return None if packed is None else NumbaSparseLinear(info.fqn, packed, info.bias, parallel)


# prunekit's own kernels: numba_{csr,bsr,nm24}[_int8][_1t] ("_1t": single-threaded twin)
for _kind in ("csr", "bsr", "nm24"):
    for _int8 in (False, True):
        for _parallel in (True, False):
            _register_numba(_kind, _int8, _parallel)
for _parallel in (True, False):  # numba_nm24r_int8[_1t]: 2:4 INT8 in row lanes, AVX-512 CPUs only
    _register_numba("nm24r", True, _parallel)


def _register_spmm(int8: bool) -> None:
    @register_candidate(f"numba_spmm_csr{'_int8' if int8 else ''}")
    def build(info: LayerInfo) -> nn.Module | None:
        packed = _pack(info, "csr", int8)
        if packed is None:
            return None
        return NumbaSparseLinear(info.fqn, packed, info.bias, True, many_rows=True, siblings=info.siblings)


# numba_spmm_csr[_int8]: CSR with the rows of x as vector lanes past batch 8 (`kernels.spmm`),
# the small-batch CSR kernels up to batch 8
for _int8 in (False, True):
    _register_spmm(_int8)


@register_candidate("numba_spmm_vnni_int8")
def _spmm_vnni(info: LayerInfo) -> nn.Module | None:
    """INT8 weights in 1 x 4 blocks times x quantized per row (VNNI) past batch 8 (`kernels.spmm_vnni`)."""
    if not (info.allow_int8 and info.weight.shape[1] % 4 == 0 and spmm_vnni.available()):
        return None
    packed = formats.pack_bsr(info.weight, spmm_vnni.QUAD, int8=True)
    return NumbaSparseLinear(info.fqn, packed, info.bias, True, many_rows=True)
