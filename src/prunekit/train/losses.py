"""Distillation losses for language models: logit KL in bounded memory, and SquareHead's feature loss."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

_CHUNK_ELEMENTS = 1 << 24  # logits per KL chunk: 64 MB of float32 per temporary


class _ChunkedKL(torch.autograd.Function):
    """T^2 * sum_tokens valid * KL(p_t || p_s) over (tokens, vocab) logits, a chunk of rows at a time.

    Autograd on the plain formula keeps five or so (tokens, vocab) float32 tensors alive (both
    log-softmaxes, the scaled copies, the product); with a 49k vocabulary that is 200 MB per
    thousand tokens each. Here forward and backward recompute the softmaxes per chunk and the
    gradient is written straight into one tensor: T * (p_s - p_t) * valid.
    """

    @staticmethod
    def forward(ctx: Any, student: Tensor, teacher: Tensor, valid: Tensor, temperature: float) -> Tensor:
        ctx.save_for_backward(student, teacher, valid)
        ctx.temperature = temperature
        total = torch.zeros((), dtype=torch.float64, device=student.device)
        for rows in _chunks(student):
            s = F.log_softmax(student[rows].float() / temperature, dim=-1)
            t = F.log_softmax(teacher[rows].float() / temperature, dim=-1)
            total += ((t.exp() * (t - s)).sum(-1) * valid[rows]).sum().double()
        return (temperature * temperature * total).float()

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None, None]:
        student, teacher, valid = ctx.saved_tensors
        temp = ctx.temperature
        out = torch.empty_like(student)
        for rows in _chunks(student):
            diff = F.softmax(student[rows].float() / temp, dim=-1) - F.softmax(teacher[rows].float() / temp, dim=-1)
            out[rows] = (diff * (valid[rows] * grad * temp).unsqueeze(-1)).to(out.dtype)
        return out, None, None, None


def _chunks(logits: Tensor) -> list[slice]:
    step = max(1, _CHUNK_ELEMENTS // logits.shape[-1])
    return [slice(i, i + step) for i in range(0, logits.shape[0], step)]


def kl_sum(student: Tensor, teacher: Tensor, valid: Tensor, temperature: float) -> Tensor:
    """T^2 * sum over valid tokens of KL(softmax(teacher/T) || softmax(student/T)), in float32.

    `student`, `teacher`: (..., vocab) logits; `valid`: (...) weights (1 = a real token).
    """
    vocab = student.shape[-1]
    return _ChunkedKL.apply(student.reshape(-1, vocab), teacher.detach().reshape(-1, vocab),
                            valid.reshape(-1).float(), temperature)


def squarehead(student: Iterable[Tensor], teacher: Iterable[Tensor], valid: Tensor) -> Tensor:
    """Sum over blocks of ||h_s - h_t||^2 / ||h_t||^2 over the valid tokens (Kurtic et al. 2023)."""
    w = valid.unsqueeze(-1)
    total = torch.zeros((), device=valid.device)
    for h_s, h_t in zip(student, teacher, strict=True):
        t = h_t.float()
        num = ((h_s.float() - t).pow(2) * w).sum()
        total = total + num / (t.pow(2) * w).sum().clamp_min(1e-12)
    return total
