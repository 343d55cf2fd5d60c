"""Calibration: activation statistics, the solvers, and the sequential block runner.

Criteria such as Wanda (Sun et al. 2023) and SparseGPT (Frantar & Alistarh 2023) look at the
inputs each Linear layer sees on a little calibration data. For a stack of repeated blocks
(an LLM's decoder layers) prunekit follows the papers' sequential recipe: capture the inputs
of block 0 once, then for each block collect statistics, solve its layers, and feed the
*pruned* block's outputs to the next one, so memory stays near one block of activations and
later blocks adapt to the errors of earlier ones. Layers outside the blocks (or every layer
of a model without repeated blocks) are calibrated in one full forward pass. The data comes
through `batches.rank_batches`; finding and feeding the blocks is `blockwise`.

`plan` must not mutate: solved weights are written into the model only while the later
blocks are calibrated, and restored afterwards (in a `finally`); `MaskPlan.apply` then
writes masks and weights together.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any, Literal

import torch
from torch import Tensor, nn

from prunekit._registry import Registry
from prunekit.core.collectives import collective_guard
from prunekit.core.criteria import ScoreContext, ScoreFn, register_criterion
from prunekit.core.distributed import all_reduce_sum, rank_and_world
from prunekit.core.inputs import call_model, to_model_device
from prunekit.core.masks import base_tensor, get_mask, n_pruned, nm_mask
from prunekit.core.memory import MemoryEstimate, MemorySize, check_budget, data_bytes, layer_work, model_bytes
from prunekit.core.plan import MaskPlan, PlanContext
from prunekit.core.progress import progress
from prunekit.core.targets import check_finite_weight
from prunekit.errors import CalibrationError, ConfigError, PlanError, UnsupportedLayerError
from prunekit.methods.batches import rank_batches
from prunekit.methods.blockwise import (
    blocks_chain,
    call_block,
    capture_inputs,
    feed,
    find_blocks,
    hidden_of,
    inputs_to,
    with_hidden,
)

log = logging.getLogger(__name__)



# --------------------------------------------------------------------------------------------
# Under torchrun: each rank calibrates on its own batches, and the statistics are summed.
#
# Every statistic is a sum over calibration rows (Wanda's squared norms, SparseGPT's X^T X and
# the row count), so summing them over ranks gives exactly what one process that saw every
# rank's batches would hold. Each rank then solves the same layers from the same sums, so every
# rank ends with the same masks and weights, and the sequential runner feeds each rank's own
# batches through the same pruned block. Works with any backend: gloo on CPU, NCCL on GPUs.


def _sum_across_ranks(stats: dict[str, LayerStats]) -> None:
    """Sum every layer's statistics over ranks, in place (a no-op in one process)."""
    if rank_and_world()[1] == 1:
        return
    for fqn in sorted(stats):  # the same order on every rank: collectives pair up by call order
        st = stats[fqn]
        with collective_guard("all_reduce", f"calibration statistics of layer {fqn!r}"):
            st.sq_norm = all_reduce_sum(st.sq_norm)
            if st.xtx is not None:
                st.xtx = all_reduce_sum(st.xtx)
            st.rows = int(all_reduce_sum(torch.tensor([st.rows], dtype=torch.int64)).item())


# --------------------------------------------------------------------------------------------
# Patterns and solvers.


@dataclass(frozen=True)
class Pattern:
    """The sparsity pattern a solver must produce for one layer.

    `unstructured` prunes `sparsity` of every output row (Wanda's per-output comparison group);
    `nm` keeps `n` of every `m` along the input dimension.
    """

    kind: Literal["unstructured", "nm"]
    sparsity: float = 0.0
    n: int = 0
    m: int = 0

    def select(self, scores: Tensor) -> Tensor:
        """Keep mask (True = keep) for `scores` of shape (out, in)."""
        if self.kind == "nm":
            return nm_mask(scores, self.n, self.m)
        cols = scores.shape[1]
        keep = cols - n_pruned(cols, self.sparsity)
        mask = torch.zeros_like(scores, dtype=torch.bool)
        mask.scatter_(1, torch.topk(scores.float(), keep, dim=1).indices, True)
        return mask


def full_precision() -> contextlib.ExitStack:
    """Turn autocast off: statistics and solvers (Cholesky, OBS updates) need float32 even
    when the caller runs the forward passes under bf16/fp16 autocast."""
    stack = contextlib.ExitStack()
    stack.enter_context(torch.autocast("cpu", enabled=False))
    if torch.cuda.is_available():
        stack.enter_context(torch.autocast("cuda", enabled=False))
    return stack


@dataclass
class LayerStats:
    """What a Linear layer's inputs looked like on the calibration data.

    `sq_norm[j]` is the sum of squares of input feature j (so Wanda's ||X_j||_2 is its root);
    `xtx` is the sum of x x^T over all rows (only kept when a solver needs the Hessian).
    """

    fqn: str
    sq_norm: Tensor
    xtx: Tensor | None = None
    rows: int = 0

    def add(self, x: Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1])
        with full_precision():
            # One pass over x in its own dtype, accumulating in float32. A NaN/Inf input makes its
            # column's sum NaN/Inf, so checking the sums checks x (a quarter of Wanda's time
            # went to converting, checking and squaring x in separate passes).
            sq = torch.linalg.vector_norm(x, dim=0, dtype=torch.float32).square()
            if not torch.isfinite(sq).all():
                raise CalibrationError(f"layer {self.fqn!r}: its calibration inputs contain NaN/Inf "
                                       "(or values too large to square in float32)")
            self.sq_norm += sq
            if self.xtx is not None:
                xf = x.float()
                self.xtx.addmm_(xf.T, xf)
        self.rows += x.shape[0]

    def hessian(self) -> Tensor:
        """SparseGPT's layer Hessian H = 2 X^T X / rows of the squared reconstruction error."""
        if self.xtx is None:
            raise PlanError(f"layer {self.fqn!r}: Hessian statistics were not collected")
        return self.xtx * (2.0 / max(self.rows, 1))


SolverFn = Callable[[Tensor, "Tensor | None", LayerStats, Pattern, str], "tuple[Tensor, Tensor | None]"]


@dataclass(frozen=True)
class SolverInfo:
    """A calibration solver: maps (weight, previous keep mask, stats, pattern, fqn) to
    (keep mask, new weight or None). `hessian` says whether it needs X^T X."""

    name: str
    fn: SolverFn
    hessian: bool = False
    updates_weights: bool = False


SOLVERS: Registry[str, SolverInfo] = Registry("calibration solver")


def register_solver(
    name: str,
    *,
    score: ScoreFn | None = None,
    hessian: bool = False,
    updates_weights: bool = False,
    reference: str = "",
) -> Callable[[SolverFn], SolverFn]:
    """Decorator: register the calibration criterion `name`, once, with its layer solver.

    The criterion joins the criterion table too (so configs accept the name), scored by
    `score` where the method has an element-wise score (Wanda, used by global ranking), or by
    a function that says the criterion only solves whole layers (SparseGPT).
    """

    def wrap(fn: SolverFn) -> SolverFn:
        if name in SOLVERS:
            raise ConfigError(f"calibration solver {name!r} is already registered")
        register_criterion(name, needs_data=True, reference=reference)(score or _solver_only(name))
        SOLVERS.register(name, SolverInfo(name, fn, hessian, updates_weights))
        return fn

    return wrap


def _solver_only(name: str) -> ScoreFn:
    def no_score(weight: Tensor, ctx: ScoreContext) -> Tensor:
        raise ConfigError(
            f"layer {ctx.fqn!r}: criterion {name!r} reconstructs layers and has no standalone score; "
            "use it through prunekit.prune(..., data=...) with scope='layer' or NMConfig"
        )

    return no_score


def get_solver(name: str) -> SolverInfo:
    """The solver for criterion `name`; the error lists the known ones."""
    return SOLVERS.get(name)


def list_solvers() -> list[str]:
    """Names of the registered calibration solvers, sorted."""
    return SOLVERS.names()


# --------------------------------------------------------------------------------------------
# Statistics capture.


def collect_stats(
    modules: dict[str, nn.Module], run: Callable[[], None], *, hessian: bool
) -> dict[str, LayerStats]:
    """Hook the given Linear layers, call `run()` (which feeds data), return their stats."""
    stats, handles = {}, []
    for fqn, module in modules.items():
        n_in = int(module.weight.shape[1])  # type: ignore[index]
        st = LayerStats(fqn, torch.zeros(n_in), torch.zeros(n_in, n_in) if hessian else None)
        stats[fqn] = st
        handles.append(module.register_forward_hook(lambda _m, inp, _out, st=st: st.add(inp[0].cpu())))
    try:
        run()
    finally:
        for h in handles:
            h.remove()
    _sum_across_ranks(stats)
    for fqn, st in stats.items():
        if st.rows == 0:
            raise CalibrationError(f"layer {fqn!r} saw no calibration inputs (is it used in forward?)")
        if not bool(st.sq_norm.any()):  # SparseGPT would zero the whole layer; Wanda would rank ties
            raise CalibrationError(f"layer {fqn!r}: every calibration input it saw is zero, so there is nothing "
                                   "to rank its weights by; use real calibration data or exclude the layer")
    return stats


# --------------------------------------------------------------------------------------------
# The runner.


def _check_layers(modules: dict[str, nn.Module], fqns: list[str], criterion: str) -> None:
    for fqn in fqns:
        module = modules[fqn]
        if not isinstance(module, nn.Linear):
            raise UnsupportedLayerError(
                f"layer {fqn!r} is a {type(module).__name__}; criterion {criterion!r} prunes nn.Linear "
                "layers only: exclude it or use criterion='l1'"
            )
        check_finite_weight(fqn, module, f"prune it with {criterion!r}")


class _Runner:
    """Solves layers one group at a time, keeping solved weights in the model until `restore`."""

    def __init__(self, modules: dict[str, nn.Module], solver: SolverInfo,
                 pattern: Pattern | dict[str, Pattern]) -> None:
        self.modules, self.solver, self.pattern = modules, solver, pattern
        self.plan = MaskPlan()
        self._saved: list[tuple[Tensor, Tensor]] = []

    def solve(self, stats: dict[str, LayerStats]) -> None:
        for fqn, st in stats.items():
            module = self.modules[fqn]
            weight = module.weight.detach().float().cpu().clone()  # type: ignore[operator]
            prev = get_mask(module)
            keep_prev = None if prev is None else prev.mask.cpu()
            with full_precision():
                pattern = self.pattern[fqn] if isinstance(self.pattern, dict) else self.pattern
                keep, new = self.solver.fn(weight, keep_prev, st, pattern, fqn)
            base = base_tensor(module, "weight")
            key = f"{fqn}.weight"
            self.plan.masks[key] = keep.to(base.device)
            if new is not None:
                self.plan.weights[key] = new.to(base.device, base.dtype)
            self._saved.append((base, base.detach().clone()))
            with torch.no_grad():  # later layers calibrate through this pruned one
                base.copy_(((new if new is not None else weight) * keep).to(base.device, base.dtype))

    def restore(self) -> None:
        with torch.no_grad():
            for base, old in reversed(self._saved):
                base.copy_(old)
        self._saved.clear()


# --------------------------------------------------------------------------------------------
# Memory: what a pass will hold at its peak, checked against `max_memory` before it starts.


def calibration_estimate(
    model: nn.Module,
    fqns: Sequence[str],
    batches: Sequence[Any],
    solver: Any,
    block_input_bytes: int = 0,
    blocks: Sequence[str] = (),
) -> MemoryEstimate:
    """Peak bytes of a calibration pass over `fqns` (Linear layers) with `solver`.

    Statistics (sum of squares per input; SparseGPT's fp32 d x d Hessians) are held for one
    block at a time when the model has repeated `blocks`, else for all layers at once;
    `block_input_bytes` is one batch's input to a block (held for every batch, twice while
    the block's outputs are computed).
    """
    modules = dict(model.named_modules())
    kept = scratch = 0
    per_block: dict[str, int] = {}
    for fqn in fqns:
        k, s, st = layer_work(modules[fqn].weight, solver.hessian, solver.updates_weights)  # type: ignore[arg-type]
        kept, scratch = kept + k, max(scratch, s)
        owner = next((b for b in blocks if fqn.startswith(b + ".")), "")
        per_block[owner] = per_block.get(owner, 0) + st
    parts = {
        "model": model_bytes(model),
        "calibration batches": sum(data_bytes(b) for b in batches),
        "block activations": 2 * block_input_bytes * len(batches),
        "weights kept to restore + plan": kept,
        "hessians" if solver.hessian else "statistics": max(per_block.values(), default=0),
        "solver scratch": scratch,
    }
    return MemoryEstimate(f"{solver.name} calibration of {len(fqns)} layers", parts)


def check_calibration_memory(
    model: nn.Module, fqns: list[str], batches: list[Any], solver: Any, max_memory: MemorySize | None
) -> None:
    """Refuse a calibration pass that would exceed `max_memory`, before any statistic is taken."""
    if max_memory is None:
        return
    blocks = find_blocks(model, fqns)
    block_input = 0
    if blocks:  # one batch run only as far as block 0: what each captured batch will cost
        with torch.no_grad():
            captured = inputs_to(model, blocks[0][1], batches[0])
        block_input = data_bytes(list(captured)) if captured is not None else 0
    estimate = calibration_estimate(model, fqns, batches, solver, block_input, [b for b, _ in blocks or []])
    check_budget(estimate, max_memory, "Use fewer or shorter calibration batches, fewer layers per pass "
                 "(exclude some), or a larger max_memory.")


def plan_with_data(
    model: nn.Module, fqns: list[str], ctx: PlanContext, criterion: str, pattern: Pattern | dict[str, Pattern]
) -> MaskPlan:
    """Plan `pattern` on the Linear layers `fqns` with a calibration solver, block by block.

    `pattern` may be one per layer (FQN -> Pattern): per-layer sparsities, e.g. an allocation,
    are then solved in the same single sequential pass as one uniform pattern.

    Does not mutate `model` (solved weights are restored before returning).

    Raises:
        CalibrationError: missing/empty data, a layer that saw no inputs, NaN/Inf activations.
        UnsupportedLayerError: a target is not nn.Linear.
        PlanError: a target's weight has NaN/Inf, or its Hessian stays singular.
    """
    solver = get_solver(criterion)
    modules = dict(model.named_modules())
    _check_layers(modules, fqns, criterion)
    batches = rank_batches(ctx.data)
    check_calibration_memory(model, fqns, batches, solver, ctx.max_memory)
    runner = _Runner(modules, solver, pattern)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            rest = list(fqns)
            blocks = find_blocks(model, fqns)
            inputs = capture_inputs(model, blocks[0][1], batches) if blocks else []
            if blocks and not blocks_chain(model, blocks, batches[0], inputs[0]):
                log.warning("blocks under %r are not chained output-to-input; calibrating in one pass",
                            blocks[0][0].rpartition(".")[0])
                blocks = None
            if blocks:
                last = max(i for i, (b, _) in enumerate(blocks) if any(f.startswith(b + ".") for f in fqns))
                bar = progress(blocks[: last + 1], f"{criterion} blocks", ctx.progress, leave=True)
                for i, (bname, block) in enumerate(bar):
                    names = [f for f in fqns if f.startswith(bname + ".")]
                    if names:
                        stats = collect_stats(
                            {f: modules[f] for f in names},
                            partial(feed, partial(call_block, block), inputs),
                            hessian=solver.hessian,
                        )
                        runner.solve(stats)
                        rest = [f for f in rest if f not in names]
                    if i < last:
                        inputs = [with_hidden(a, k, hidden_of(block(*a, **k))) for a, k in inputs]
                del inputs
            if rest:
                log.info("calibrating %d layers outside repeated blocks in one full pass", len(rest))
                stats = collect_stats(
                    {f: modules[f] for f in rest},
                    lambda: feed(lambda b: call_model(model, to_model_device(model, b)), batches),
                    hessian=solver.hessian,
                )
                runner.solve(stats)
    finally:
        runner.restore()
        model.train(was_training)
    return runner.plan


def dense_pass_stats(model: nn.Module, fqns: list[str], ctx: PlanContext, criterion: str) -> None:
    """Input norms of every target from one pass of the dense model, into `ctx.stats`.

    What a global ranking needs: every layer scored on the same, unpruned statistics. Checks the
    layers, the data and `ctx.max_memory` first.
    """
    modules = dict(model.named_modules())
    _check_layers(modules, fqns, criterion)
    batches = rank_batches(ctx.data)
    check_calibration_memory(model, fqns, batches, get_solver(criterion), ctx.max_memory)
    with torch.no_grad():
        stats = collect_stats(
            {f: modules[f] for f in fqns},
            lambda: feed(lambda b: call_model(model, to_model_device(model, b)), batches),
            hessian=False,
        )
    ctx.stats.update({f: {"sq_norm": st.sq_norm} for f, st in stats.items()})
