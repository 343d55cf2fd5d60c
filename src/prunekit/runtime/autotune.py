"""`accelerate(model, example_inputs)`: measure each sparse Linear's implementations in place, install the fastest.

Why in place: at batch 1-8 a Linear layer is bound by reading its weights, and whether they come
from DRAM or from cache decides the winner. Timing one layer in a loop keeps its weights in cache
and flatters every kernel; timing each layer inside whole forward passes of the real model puts
its weights wherever the model leaves them. So each candidate is installed in every layer it
applies to, the model runs forward, and a thin timing wrapper records each layer's milliseconds;
candidates take turns forward by forward (interleaved), so load on the machine hits them alike.
"""

from __future__ import annotations

import logging
import math
import statistics
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils import _pytree as pytree

from prunekit.core.distributed import rank_and_world
from prunekit.core.inputs import call_model
from prunekit.errors import ConfigError, PrunekitError, UnsupportedLayerError
from prunekit.measure.heap import retained_memory
from prunekit.runtime import attention, formats, fusion
from prunekit.runtime import candidates as cand
from prunekit.runtime.decisions import AccelerationReport, LayerDecision
from prunekit.runtime.kernels.numba_setup import import_numba

log = logging.getLogger(__name__)

MAX_SLOWDOWN = 0.05  # a kernel may be at most 5 % slower than dense at any tuned batch size
TOLERANCE_FP32 = 1e-4  # max |y - y_dense| / max |y_dense| over the outputs on example_inputs
TOLERANCE_INT8 = 5e-2


class _Timed(nn.Module):
    """Runs `inner` and appends its wall time in ms to `sink` (no sync needed: CPU only)."""

    def __init__(self, inner: nn.Module, sink: list[float] | None) -> None:
        super().__init__()
        self.inner, self.sink = inner, sink

    def forward(self, x: Tensor) -> Tensor:
        start = time.perf_counter()
        y = self.inner(x)
        if self.sink is not None:
            self.sink.append((time.perf_counter() - start) * 1e3)
        return y


def _set(model: nn.Module, fqn: str, module: nn.Module) -> None:
    parent_name, _, child = fqn.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def _with_batch(inputs: Any, batch: int) -> Any:
    """`inputs` with every tensor's leading dimension cycled to `batch` rows."""

    def take(t: Any) -> Any:
        if isinstance(t, Tensor) and t.dim() >= 1 and t.shape[0] > 0:
            return t[torch.arange(batch) % t.shape[0]]
        return t

    return pytree.tree_map(take, inputs)


def _eligible(model: nn.Module, min_sparsity: float) -> dict[str, nn.Linear]:
    # nn.MultiheadAttention reads its out_proj's weight directly instead of calling it: leave it.
    inside_mha = {
        f"{fqn}.{child}" if fqn else child
        for fqn, m in model.named_modules()
        if isinstance(m, nn.MultiheadAttention)
        for child, _ in m.named_children()
    }
    found = {}
    for fqn, m in model.named_modules():
        if isinstance(m, nn.Linear) and fqn and fqn not in inside_mha:
            w = m.weight
            if w.dtype == torch.float32 and w.device.type == "cpu" and float((w == 0).float().mean()) >= min_sparsity:
                found[fqn] = m
    return found


def _build(fqn: str, layer: nn.Linear, names: Sequence[str], allow_int8: bool) -> tuple[dict[str, nn.Module], Any]:
    with torch.no_grad():
        weight = layer.weight.detach().clone()  # effective weight: a Mask parametrization is applied here
        bias = None if layer.bias is None else layer.bias.detach().clone()
    info = cand.LayerInfo(fqn, weight, bias, formats.detect_block(weight), formats.is_2_4(weight), allow_int8)
    dense = cand.get_candidate("dense")(info)
    assert dense is not None  # the dense builder applies to every layer
    built: dict[str, nn.Module] = {"dense": dense}
    for name in names:
        if name == "dense":
            continue
        try:
            module = cand.get_candidate(name)(info)
        except (RuntimeError, ValueError) as err:  # a back end that rejects this layer is no candidate
            log.info("accelerate: %s skipped for %r: %s", name, fqn, err)
            continue
        if module is not None:
            built[name] = module.eval()
    return built, info


@torch.no_grad()
def _measure(
    model: nn.Module,
    built: dict[str, dict[str, nn.Module]],
    inputs: Any,
    repeats: int,
    warmup: int,
    fallback: str = "dense",
) -> dict[str, dict[str, list[float]]]:
    """fqn -> candidate -> times (ms) at one batch size, candidates taking turns forward by forward.

    A layer without the candidate of a turn runs its `fallback` one (untimed) during that turn.
    """
    names = sorted({n for per in built.values() for n in per})
    times: dict[str, dict[str, list[float]]] = {f: {n: [] for n in per} for f, per in built.items()}
    for rep in range(warmup + repeats):
        shift = rep % len(names)  # rotate the order, so no candidate always follows the same one
        for name in names[shift:] + names[:shift]:
            for fqn, per in built.items():
                sink = times[fqn][name] if name in per and rep >= warmup else None
                _set(model, fqn, _Timed(per[name] if name in per else per[fallback], sink))
            call_model(model, inputs)
    return times


def _choose(d: LayerDecision, batch_sizes: Sequence[int], margin: float) -> None:
    best, best_score = "dense", 1.0
    for name, per_batch in d.ms.items():
        ratios = [per_batch[b] / max(d.ms["dense"][b], 1e-9) for b in batch_sizes]
        score = math.exp(sum(math.log(max(r, 1e-9)) for r in ratios) / len(ratios))
        if max(ratios) <= 1.0 + MAX_SLOWDOWN and score <= 1.0 - margin and score < best_score:
            best, best_score = name, score
    d.choice = best
    d.reason = "" if best != "dense" else f"nothing >= {margin:.0%} faster than dense"


def _leaves(out: Any) -> list[Tensor]:
    return [t for t in pytree.tree_leaves(out) if isinstance(t, Tensor) and t.is_floating_point()]


def _rel_error(ref: Any, out: Any) -> float:
    pairs = list(zip(_leaves(ref), _leaves(out), strict=True))
    err = max((float((a - b).abs().max()) for a, b in pairs if a.numel()), default=0.0)
    scale = max((float(a.abs().max()) for a, _ in pairs if a.numel()), default=0.0)
    return err / max(scale, 1e-12)


def _validate(batch_sizes: Sequence[int], names: Sequence[str], repeats: int, warmup: int, margin: float) -> None:
    if not batch_sizes or any(not isinstance(b, int) or b < 1 for b in batch_sizes):
        raise ConfigError(f"accelerate: batch_sizes must be positive ints, got {tuple(batch_sizes)!r}")
    unknown = [n for n in names if n not in cand.list_candidates()]
    if unknown:
        raise ConfigError(f"accelerate: unknown candidates {unknown}; known: {', '.join(cand.list_candidates())}")
    if repeats < 1 or warmup < 0 or not 0.0 <= margin < 1.0:
        raise ConfigError(
            f"accelerate: need repeats >= 1, warmup >= 0, 0 <= margin < 1; got {repeats}, {warmup}, {margin}"
        )
    if any(n.startswith("numba") for n in names):
        import_numba()  # numba missing: a PrunekitError naming `pip install 'prunekit[speed]'`, before any change


def _refuse_distributed() -> None:
    """`accelerate` is per-process: it times kernels on this process's CPU and installs them in its model copy."""
    rank, world = rank_and_world()
    if world > 1:
        raise ConfigError(
            f"accelerate cannot run inside a process group of {world} ranks (this is rank {rank}): it times "
            "kernels on this process's CPU, which the other ranks share, and installs them in this process's "
            "model only, so it would run once per rank and measure noise. Run it in one process after the "
            "distributed run: load the saved model there (prunekit.load) and call accelerate"
        )


def accelerate(
    model: nn.Module,
    example_inputs: Any,
    batch_sizes: Sequence[int] = (1, 8),
    *,
    allow_int8: bool = False,
    candidates: Sequence[str] | None = None,
    min_sparsity: float = 0.25,
    margin: float = 0.1,
    fuse: bool = True,
    attention_kernel: bool = True,
    repeats: int = 15,
    warmup: int = 3,
    tolerance: float | None = None,
    table_path: str | Path | None = None,
    verbose: bool = True,
) -> nn.Module:
    """Replace each sparse `nn.Linear` by its fastest measured implementation (mutates `model`, returns it).

    For every float32 CPU `nn.Linear` with at least `min_sparsity` zeros (a `Mask`
    parametrization counts: its effective weight is used), each candidate in
    `candidates.list_candidates()` that applies (dense `F.linear`, dense oneDNN, torch CSR,
    torch BSR when the zeros form blocks, prunekit's numba CSR/BSR/2:4 kernels, and INT8 ones
    only with `allow_int8`, among them INT8 x INT8 with VNNI for many rows) is timed in place
    inside whole forward passes at each batch size. A candidate is installed when its
    geometric-mean time over `batch_sizes` is at least `margin` below dense and it is at most
    5 % slower than dense at every batch size; then the installed layers are timed against
    dense once more, and any layer more than 5 % slower is put back to dense.
    With `fuse`, Linears that read the same input tensor (q/k/v, gate/up), none left dense,
    are then timed as one stacked call (with each kernel they chose) against their separate
    calls, and fused where that is faster at every batch size (`fusion`).
    With `attention_kernel`, a transformers model on the SDPA attention backend (the default) is
    timed whole with prunekit's CPU attention kernel (`attention`) against SDPA, and keeps the
    kernel where its forwards are faster at every batch size.
    Finally the outputs on `example_inputs` must match the dense model's: relative error at
    most 1e-4 (fp32 kernels) or 5e-2 (if an INT8 kernel was installed).

    Replaced layers are inference-only modules that keep the layer's name; the decision table is
    attached as `model.prunekit_acceleration` (an `AccelerationReport`).

    Args:
        model: the model; put in eval mode and left there.
        example_inputs: a tensor, tuple of args or dict of kwargs; tensors' leading dimension is
            cycled to each batch size.
        batch_sizes: the batch sizes to tune for.
        allow_int8: also consider INT8 kernels (changes outputs by ~1 %).
        candidates: names to consider (default: all registered); "dense" is always measured.
        min_sparsity: layers with fewer zeros are left alone.
        margin: how much faster (geometric mean over batch sizes) a candidate must be than dense.
        fuse: try one kernel call for sibling Linears (same input) where it measures faster.
        attention_kernel: try prunekit's attention kernel in a transformers model (kept where faster).
        tolerance: the relative output error accepted; default 1e-4, or 5e-2 once an INT8
            kernel is installed (an LLM's logits may need more: measure dense INT8's drift first).
        repeats, warmup: timed and untimed forward passes per candidate and batch size.
        table_path: if given, the decision table is written there as JSON (atomically).
        verbose: print the decision table (rich).

    Returns:
        `model`, with the chosen layers replaced.

    Raises:
        ConfigError: bad batch sizes, candidate names or measurement settings; or called inside a
            torch.distributed process group of more than one rank (it is per-process).
        PrunekitError: numba is missing (install `prunekit[speed]`), or the accelerated outputs
            differ from dense beyond the tolerance (the model is then restored).
        UnsupportedLayerError: no eligible layer was found.

    Example:
        >>> model = accelerate(model, torch.randn(1, 768), batch_sizes=(1, 8))  # doctest: +SKIP
    """
    _refuse_distributed()
    names = list(candidates) if candidates is not None else cand.list_candidates()
    _validate(batch_sizes, names, repeats, warmup, margin)
    if tolerance is not None and not (tolerance > 0 and math.isfinite(tolerance)):
        raise ConfigError(f"accelerate: tolerance must be a positive finite number, got {tolerance!r}")
    model.eval()
    layers = _eligible(model, min_sparsity)
    if not layers:
        raise UnsupportedLayerError(
            f"accelerate: no float32 CPU nn.Linear in {type(model).__name__} has "
            f">= {min_sparsity:.0%} zeros; prune it first"
        )
    with torch.no_grad():
        reference = call_model(model, example_inputs)
    siblings = fusion.sibling_groups(model, list(layers), example_inputs) if fuse else []
    built, infos, decisions = {}, {}, []
    for fqn, layer in layers.items():
        built[fqn], infos[fqn] = _build(fqn, layer, names, allow_int8)
        sparsity = float((infos[fqn].weight == 0).float().mean())
        decisions.append(LayerDecision(fqn, tuple(infos[fqn].weight.shape), sparsity, infos[fqn].block, {}))
    backend = attention.backend_of(model)  # restored on failure
    try:
        with retained_memory():  # time the kernels, not glibc re-faulting activations
            for b in batch_sizes:
                times = _measure(model, built, _with_batch(example_inputs, b), repeats, warmup)
                for d in decisions:
                    for name, t in times[d.fqn].items():
                        d.ms.setdefault(name, {})[b] = statistics.median(t)
            for d in decisions:
                _choose(d, batch_sizes, margin)
            _check_speed(model, built, decisions, example_inputs, batch_sizes, repeats, warmup)

            def measure(trials: dict[str, dict[str, nn.Module]], batch: int) -> dict[str, dict[str, list[float]]]:
                inputs = _with_batch(example_inputs, batch)
                return _measure(model, trials, inputs, repeats, warmup, fallback="separate")

            fused = fusion.fuse(siblings, built, infos, decisions, batch_sizes, measure)
        for d in decisions:
            if d.fqn in fused:
                _set(model, d.fqn, fused[d.fqn])
            else:
                _set(model, d.fqn, built[d.fqn][d.choice] if d.choice != "dense" else layers[d.fqn])
        attention_choice = ""
        if attention_kernel and attention.applies(model):
            with retained_memory():
                attention_choice = attention.try_in(
                    model, {b: _with_batch(example_inputs, b) for b in batch_sizes}, repeats, warmup)
        with torch.no_grad():
            error = _rel_error(reference, call_model(model, example_inputs))
        if tolerance is None:
            tolerance = TOLERANCE_INT8 if any(cand.is_int8_candidate(d.choice) for d in decisions) else TOLERANCE_FP32
        if not error <= tolerance:
            replaced = [d for d in decisions if d.choice != "dense"]
            kinds = Counter(d.choice for d in replaced)
            first = ", ".join(d.fqn for d in replaced[:3]) + (", ..." if len(replaced) > 3 else "")
            raise PrunekitError(
                f"accelerate: outputs differ from dense by {error:.2e} relative (tolerance {tolerance:.2e}) "
                f"after replacing {len(replaced)} layers ({', '.join(f'{n}: {c}' for n, c in kinds.items())}; "
                f"{first}); model restored. Pass a larger tolerance= if that error is acceptable"
                f"{', or allow_int8=False' if any(cand.is_int8_candidate(n) for n in kinds) else ''}"
            )
    except BaseException:
        for fqn, layer in layers.items():
            _set(model, fqn, layer)
        if backend is not None and attention.applies(model):
            attention.set_backend(model, backend)
        raise
    report = AccelerationReport(tuple(batch_sizes), torch.get_num_threads(), tolerance, error, decisions,
                                attention_choice)
    model.prunekit_acceleration = report  # type: ignore[assignment]
    if table_path is not None:
        report.save(table_path)
    if verbose:
        from rich.console import Console

        Console().print(report.rich_table())
    log.info("%s", report.summary())
    return model


def _check_speed(
    model: nn.Module,
    built: dict[str, dict[str, nn.Module]],
    decisions: list[LayerDecision],
    example_inputs: Any,
    batch_sizes: Sequence[int],
    repeats: int,
    warmup: int,
) -> None:
    """Time each chosen kernel against dense once more (installed together); revert those > 5 % slower."""
    chosen = {
        d.fqn: {"dense": built[d.fqn]["dense"], "chosen": built[d.fqn][d.choice]}
        for d in decisions
        if d.choice != "dense"
    }
    if not chosen:
        return
    for b in batch_sizes:
        times = _measure(model, chosen, _with_batch(example_inputs, b), repeats, warmup)
        for d in decisions:
            if d.fqn in times:
                d.check_ms.setdefault("dense", {})[b] = statistics.median(times[d.fqn]["dense"])
                d.check_ms.setdefault(d.choice, {})[b] = statistics.median(times[d.fqn]["chosen"])
    for d in decisions:
        if d.fqn not in chosen:
            continue
        worst = max(d.check_ms[d.choice][b] / max(d.check_ms["dense"][b], 1e-9) for b in batch_sizes)
        if worst > 1.0 + MAX_SLOWDOWN:
            d.reason = f"{d.choice} reverted: {worst:.2f}x dense's time when re-checked"
            d.choice = "dense"
