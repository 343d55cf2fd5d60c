"""Real CPU speed from sparsity: prunekit's own sparse kernels and `accelerate` (in `autotune`), which picks per layer.

Kernels: `kernels` (numba, imported on first use; `kernels.bind` runs any packed format, `kernels.spmm`
is the many-row CSR kernel for batch 16-128 and encoders, `kernels.attention` a CPU attention kernel),
packed by `formats`; the candidates `accelerate` measures are registered in `candidates`, the
attention kernel's torch op and transformers backend are `attention`, and what `accelerate`
decided is a `decisions.AccelerationReport`.
"""

from __future__ import annotations

from prunekit.runtime.autotune import accelerate
from prunekit.runtime.candidates import list_candidates, register_candidate
from prunekit.runtime.decisions import AccelerationReport, LayerDecision

__all__ = ["AccelerationReport", "LayerDecision", "accelerate", "list_candidates", "register_candidate"]
