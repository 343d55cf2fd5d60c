"""SparseGPT: one-shot pruning with layer-wise second-order reconstruction.

Frantar & Alistarh 2023, "SparseGPT: Massive Language Models Can Be Accurately Pruned in
One-Shot". For each Linear layer with calibration inputs X it approximately solves
min ||W X - W' X||^2 over masked W'. Columns are processed left to right in blocks; pruning a
weight is compensated by updating the not-yet-processed weights of its row with the inverse
Hessian H^-1, H = 2 X X^T (the Optimal Brain Surgeon update, Hassibi & Stork 1993). The
row-wise inverse-Hessian sequence is read off one upper Cholesky factor of H^-1, and masks are
chosen adaptively per column block (or per N:M group) by the OBS saliency w^2 / [H^-1]_jj^2.
"""

from __future__ import annotations

import logging

import torch
from torch import Tensor

from prunekit.core.masks import n_pruned
from prunekit.errors import PlanError
from prunekit.methods.calibration import LayerStats, Pattern, register_solver

log = logging.getLogger(__name__)

_REF = "Frantar & Alistarh 2023, SparseGPT: Massive Language Models Can Be Accurately Pruned in One-Shot"
BLOCKSIZE = 128
PERCDAMP = 0.01


def inverse_hessian_factor(h: Tensor, fqn: str, percdamp: float = PERCDAMP, retries: int = 4) -> Tensor:
    """Upper Cholesky factor of (H + damp I)^-1, raising damping tenfold on failure.

    Raises:
        PlanError: H is still not positive definite at the largest damping tried.
    """
    mean_diag = float(torch.diag(h).mean())
    damp = percdamp
    for attempt in range(retries + 1):
        damped = h + torch.eye(h.shape[0], dtype=h.dtype) * damp * max(mean_diag, 1e-8)
        chol, info = torch.linalg.cholesky_ex(damped)
        if int(info) == 0:
            hinv = torch.cholesky_inverse(chol)
            upper, info = torch.linalg.cholesky_ex(hinv, upper=True)
            if int(info) == 0 and torch.isfinite(upper).all():
                if attempt:
                    log.warning("layer %r: Hessian needed damping %.3g x mean diag", fqn, damp)
                return upper
        damp *= 10
    raise PlanError(
        f"layer {fqn!r}: calibration Hessian is singular even with damping {damp / 10:.3g} x mean diagonal; "
        "use more (or more varied) calibration data, or exclude the layer"
    )


def sparsegpt_layer(
    weight: Tensor,
    hessian: Tensor,
    pattern: Pattern,
    *,
    keep: Tensor | None = None,
    blocksize: int = BLOCKSIZE,
    percdamp: float = PERCDAMP,
    fqn: str = "<layer>",
) -> tuple[Tensor, Tensor]:
    """Prune one (out, in) weight to `pattern` and reconstruct the rest (pure; returns copies).

    Args:
        weight: the layer's weight (out, in); not modified.
        hessian: H = 2 X^T X / rows from calibration inputs (in, in).
        pattern: unstructured (per column block) or N:M.
        keep: a previous keep mask; weights it pruned stay pruned.
        blocksize: columns per lazy-update block (a multiple of m for N:M).
        percdamp: damping as a fraction of H's mean diagonal (raised on failure).

    Returns:
        `(keep_mask, new_weight)`, new_weight zero where the mask is False.
    """
    w = weight.detach().float().clone()
    h = hessian.detach().float().clone()
    rows, cols = w.shape
    if pattern.kind == "nm" and blocksize % pattern.m:
        blocksize = pattern.m * max(1, blocksize // pattern.m)
    dead = torch.diag(h) == 0  # inputs that are always zero: prune their weights for free
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    hinv = inverse_hessian_factor(h, fqn, percdamp)
    pruned = torch.zeros_like(w, dtype=torch.bool)
    forced = torch.zeros_like(w, dtype=torch.bool) if keep is None else ~keep.to(torch.bool)
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        w1, hinv1 = w[:, i1:i2].clone(), hinv[i1:i2, i1:i2]
        q1, err1 = torch.zeros_like(w1), torch.zeros_like(w1)
        d = torch.diag(hinv1)
        if pattern.kind == "unstructured":
            sal = (w1**2 / d.unsqueeze(0) ** 2).masked_fill(forced[:, i1:i2], float("-inf"))
            k = n_pruned(sal.numel(), pattern.sparsity)
            mask1 = torch.zeros(sal.numel(), dtype=torch.bool)
            mask1[torch.topk(sal.reshape(-1), k, largest=False).indices] = True
            mask1 = mask1.view_as(sal)
        else:
            mask1 = torch.zeros_like(w1, dtype=torch.bool)
        for i in range(i2 - i1):
            col = w1[:, i]
            if pattern.kind == "nm" and i % pattern.m == 0:
                sal = w1[:, i : i + pattern.m] ** 2 / d[i : i + pattern.m].unsqueeze(0) ** 2
                sal = sal.masked_fill(forced[:, i1 + i : i1 + i + pattern.m], float("-inf"))
                drop = torch.topk(sal, pattern.m - pattern.n, dim=1, largest=False).indices
                mask1.scatter_(1, i + drop, True)
            q = col.masked_fill(mask1[:, i], 0.0)
            q1[:, i] = q
            e = (col - q) / hinv1[i, i]
            w1[:, i:] -= e.unsqueeze(1) @ hinv1[i, i:].unsqueeze(0)
            err1[:, i] = e
        w[:, i1:i2] = q1
        pruned[:, i1:i2] = mask1
        w[:, i2:] -= err1 @ hinv[i1:i2, i2:]
    keep_mask = ~pruned
    if not torch.isfinite(w).all():
        raise PlanError(f"layer {fqn!r}: SparseGPT produced NaN/Inf weights; check the calibration data")
    return keep_mask, w * keep_mask


@register_solver("sparsegpt", hessian=True, updates_weights=True, reference=_REF)
def solve_sparsegpt(
    weight: Tensor, keep: Tensor | None, stats: LayerStats, pattern: Pattern, fqn: str
) -> tuple[Tensor, Tensor]:
    """SparseGPT for one layer from its calibration statistics."""
    if stats.rows < weight.shape[1]:
        log.warning(
            "layer %r: %d calibration rows for %d inputs; the Hessian is rank-deficient and "
            "rests on damping (use more data)", fqn, stats.rows, weight.shape[1]
        )
    return sparsegpt_layer(weight, stats.hessian(), pattern, keep=keep, fqn=fqn)
