"""2:4 on the GPU: swap eligible Linear weights to PyTorch semi-structured sparse tensors.

`torch.sparse.to_sparse_semi_structured` compresses a 2:4 weight for the sparse tensor cores
of Ampere and later GPUs (Mishra et al. 2021, through cuSPARSELt or CUTLASS). Whether the
sparse matmul beats dense depends on the shape and batch size: small matmuls are dominated by
per-call host overhead and the compressed layout's bookkeeping, so prunekit times each layer
at the caller's batch size and keeps the dense weight wherever sparse is not faster.
"""

from __future__ import annotations

import logging
import statistics
from dataclasses import dataclass, field

import torch
from torch import nn

from prunekit.core.masks import get_mask
from prunekit.errors import PrunekitError
from prunekit.methods.nm import check_nm

log = logging.getLogger(__name__)

_DTYPES = (torch.float16, torch.bfloat16)


@dataclass(frozen=True)
class LayerTiming:
    """Dense vs semi-structured latency of one layer at the measured batch size."""

    dense_ms: float
    sparse_ms: float

    @property
    def speedup(self) -> float:
        return self.dense_ms / self.sparse_ms if self.sparse_ms else 0.0


@dataclass
class SemiStructuredReport:
    """Per layer: timing and whether it was converted; `skipped` gives the reasons for the rest."""

    batch_size: int
    converted: dict[str, LayerTiming] = field(default_factory=dict)
    kept_dense: dict[str, LayerTiming] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)

    def __str__(self) -> str:
        rows = [f"batch {self.batch_size}: layer, dense ms, 2:4 ms, speedup, choice"]
        for name, table in (("2:4", self.converted), ("dense", self.kept_dense)):
            rows += [f"{k}  {t.dense_ms:.4f}  {t.sparse_ms:.4f}  {t.speedup:.2f}x  {name}" for k, t in table.items()]
        rows += [f"{k}  skipped: {why}" for k, why in self.skipped.items()]
        return "\n".join(rows)


def ineligible_reason(fqn: str, module: nn.Module) -> str | None:
    """Why `module` cannot become a semi-structured 2:4 Linear, or None if it can."""
    if not isinstance(module, nn.Linear):
        return f"{type(module).__name__} is not nn.Linear"
    if get_mask(module) is not None:
        return "still masked: call prunekit.finalize(model) first"
    w = module.weight
    if w.device.type != "cuda":
        return f"weight on {w.device.type}, not CUDA"
    if w.dtype not in _DTYPES:
        return f"dtype {w.dtype} (semi-structured needs float16 or bfloat16)"
    if w.shape[0] % 64 or w.shape[1] % 64:
        return f"shape {tuple(w.shape)} is not a multiple of 64 in both dimensions"
    if not check_nm(module, 2, 4, layers=[""]).ok:
        return "weight is not 2:4 sparse"
    return None


def _time_ms(fn, repeats: int) -> float:
    for _ in range(3):  # warm-up: kernel selection, caches, lazy init
        fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


@torch.no_grad()
def to_semi_structured(
    model: nn.Module, batch_size: int, *, min_speedup: float = 1.0, repeats: int = 20
) -> SemiStructuredReport:
    """Convert 2:4 Linear weights to semi-structured sparse tensors where faster (mutates).

    Each eligible layer is timed on a random (batch_size, in_features) input, dense and sparse,
    with CUDA events (median of `repeats` after warm-up); it is converted only if sparse is at
    least `min_speedup` times faster, otherwise it stays dense. Ineligible layers are listed
    with the reason.

    Raises:
        PrunekitError: CUDA is not available (semi-structured kernels are GPU-only).
    """
    if not torch.cuda.is_available():
        raise PrunekitError("to_semi_structured needs a CUDA GPU (sparse tensor cores); none is available")
    from torch.sparse import to_sparse_semi_structured

    report = SemiStructuredReport(batch_size)
    for fqn, module in model.named_modules():
        if not isinstance(module, nn.Linear):
            continue
        reason = ineligible_reason(fqn, module)
        if reason is not None:
            report.skipped[fqn] = reason
            continue
        x = torch.randn(batch_size, module.in_features, device="cuda", dtype=module.weight.dtype)
        dense_w = module.weight.detach()
        sparse_w = to_sparse_semi_structured(dense_w)
        bias = module.bias
        timing = LayerTiming(
            _time_ms(lambda w=dense_w, x=x, b=bias: nn.functional.linear(x, w, b), repeats),
            _time_ms(lambda w=sparse_w, x=x, b=bias: nn.functional.linear(x, w, b), repeats),
        )
        if timing.speedup >= min_speedup:
            module.weight = nn.Parameter(sparse_w, requires_grad=False)
            report.converted[fqn] = timing
        else:
            report.kept_dense[fqn] = timing
        log.info("%s: dense %.4f ms, 2:4 %.4f ms -> %s", fqn, timing.dense_ms, timing.sparse_ms,
                 "2:4" if fqn in report.converted else "dense")
    return report
