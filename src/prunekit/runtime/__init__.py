"""Real CPU speed from sparsity: prunekit's own sparse kernels and `accelerate` (in `autotune`), which picks per layer.

Kernels: `kernels_numba` (numba, imported on first use), packed by `formats`; the candidates
`accelerate` measures are registered in `candidates`.
"""

from __future__ import annotations

from prunekit.runtime.autotune import AccelerationReport, LayerDecision, accelerate
from prunekit.runtime.candidates import list_candidates, register_candidate

__all__ = ["AccelerationReport", "LayerDecision", "accelerate", "list_candidates", "register_candidate"]
