"""A per-layer latency lookup table measured on this device, for `LatencyTarget` allocations.

The approach of NetAdapt (Yang et al. 2018, "NetAdapt: platform-aware neural network
adaptation for mobile applications") and AMC (He et al. 2018): time each layer alone, on the
input it really receives, at every candidate width or sparsity, and predict the model's latency
as the measured dense latency minus the per-layer savings. Each layer's variants are timed
interleaved call by call (`prunekit.measure.bench.measure_latency`), so drift on a shared machine hits
them alike.

Mask configs keep dense shapes, so with dense kernels their rows show what they really buy
on this device (usually nothing); channel configs time a genuinely narrower layer.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict
from torch import Tensor, nn

from prunekit.allocation.allocate import Budget, LatencyTarget
from prunekit.allocation.sensitivity.groups import GroupPruner
from prunekit.allocation.sensitivity.table import SensitivityTable
from prunekit.config import FrozenConfig, MaskConfig, PerLayer
from prunekit.core.inputs import call_model, run_with_hooks
from prunekit.core.progress import progress as progress_bar
from prunekit.core.targets import resolve
from prunekit.errors import ConfigError
from prunekit.measure.bench import Latency, measure_latency
from prunekit.storage.files import atomic_write_text, read_json_document, validate_document

FORMAT = "prunekit.latency_table"  # the on-disk tag of a saved table; files written by 0.1 carry it too
FORMAT_VERSION = 1


class _LatencyDocument(BaseModel):
    """The JSON schema of a saved `LatencyTable`."""

    model_config = ConfigDict(extra="forbid")
    format: Literal["prunekit.latency_table"]
    version: Literal[1]
    units: list[str]
    levels: list[float]
    dense_ms: dict[str, float]
    latency_ms: dict[str, list[float]]
    model_ms: float
    kind: Literal["layer", "group"] = "layer"
    threads: int = 1
    reference_ms: dict[str, float] | None = None
    saving_scale: float = 1.0


@dataclass
class LatencyTable:
    """Measured per-unit latency at each level, and the whole model's dense latency.

    Attributes:
        units: layer FQNs (mask configs) or channel-group names (channel configs).
        levels: the levels timed.
        dense_ms: unit -> median latency of its dense layer(s), in ms.
        latency_ms: unit -> median latency at each level, in ms.
        model_ms: median latency of the whole dense model on the example inputs, in ms.
        kind: "layer" or "group".
        threads: torch threads used for the timing.
        reference_ms: unit -> the whole dense model's median, timed interleaved with that
            unit's variants. A unit's saving is taken as a share of this and then scaled to
            `model_ms`, so load that changes between units (a shared machine) cancels out.
        saving_scale: multiplies every predicted saving; 1.0 as measured, else set by
            `calibrated` from a measured end-to-end point.
    """

    units: list[str]
    levels: list[float]
    dense_ms: dict[str, float]
    latency_ms: dict[str, list[float]]
    model_ms: float
    kind: Literal["layer", "group"] = "layer"
    threads: int = 1
    reference_ms: dict[str, float] | None = None
    saving_scale: float = 1.0

    def calibrated(self, predicted_speedup: float, measured_speedup: float) -> LatencyTable:
        """A copy whose savings are rescaled so that this table's prediction matches a measurement.

        The table adds up savings each timed alone. Pruned together, coupled groups save less
        than the sum (a layer between two pruned groups loses (1-a)(1-b) of its work, not
        1-a-b), and what the layers' own times leave out (activations, memory traffic, launch
        overhead) does not shrink with them. Both bias the prediction by roughly one factor
        near a given budget, so one measured point calibrates it: allocate, measure the pruned
        model end to end, calibrate, allocate again (a couple of rounds converge).

        Args:
            predicted_speedup: what this table predicted for an allocation (`Allocation.achieved`).
            measured_speedup: dense latency / pruned latency, timed interleaved on this device.
        """
        if predicted_speedup <= 1.0 or measured_speedup <= 1.0:
            raise ConfigError(f"calibrated: speed-ups must be > 1 to calibrate savings, got predicted "
                              f"{predicted_speedup:.4g}, measured {measured_speedup:.4g}")
        ratio = (1 - 1 / measured_speedup) / (1 - 1 / predicted_speedup)
        return replace(self, saving_scale=self.saving_scale * ratio)

    def budget(self, table: SensitivityTable, target: LatencyTarget) -> Budget:
        """The allocation budget of a `LatencyTarget` over a sensitivity table's units and levels."""
        missing = [u for u in table.units if u not in self.latency_ms]
        if missing:
            raise ConfigError(f"latency table has no timing for {missing[:4]}: measure it with the scan's config")
        index = {round(lv, 9): i for i, lv in enumerate(self.levels)}
        absent = [lv for lv in table.levels if round(lv, 9) not in index]
        if absent:
            raise ConfigError(f"latency table has no timing at levels {absent}: measure it at the scan's levels")
        total = self.model_ms

        def saving(u: str, lv: float) -> float:
            gain = max(0.0, self.dense_ms[u] - self.latency_ms[u][index[round(lv, 9)]])
            gain *= self.saving_scale
            return gain if self.reference_ms is None else gain / self.reference_ms[u] * total

        savings = {u: [saving(u, lv) for lv in table.levels] for u in table.units}
        required = total * (1.0 - 1.0 / target.speedup)
        return Budget(savings, required, lambda s: total / max(total - s, 1e-12), "measured-LUT speed-up", "speedup")

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able data, tagged with `FORMAT` and `FORMAT_VERSION`."""
        return {"format": FORMAT, "version": FORMAT_VERSION, **{k: getattr(self, k) for k in self.__dataclass_fields__}}

    def save(self, path: str | Path) -> Path:
        """Write the table as JSON, atomically."""
        return atomic_write_text(path, json.dumps(self.to_dict(), indent=2))

    @classmethod
    def load(cls, path: str | Path) -> LatencyTable:
        """Read a table written by `save`."""
        data = read_json_document(path, "latency table", ConfigError)
        if not isinstance(data, dict) or data.get("format") != FORMAT or data.get("version") != FORMAT_VERSION:
            raise ConfigError(f"{str(path)!r} is not a version-1 prunekit latency table")
        doc = validate_document(data, _LatencyDocument, f"latency table {str(path)!r}", ConfigError)
        return cls(**doc.model_dump(exclude={"format", "version"}))

    def summary(self) -> str:
        """Dense and per-level median latency of each unit, in ms."""
        width = max([len(u) for u in self.units] + [5])
        rows = [f"model {self.model_ms:.4f} ms ({self.threads} threads)",
                f"{'unit':<{width}}  {'dense':>8}  " + "  ".join(f"{lv:>8.3g}" for lv in self.levels)]
        for u in self.units:
            cells = "  ".join(f"{v:8.4f}" for v in self.latency_ms[u])
            rows.append(f"{u:<{width}}  {self.dense_ms[u]:8.4f}  {cells}")
        return "\n".join(rows)


def _layer_inputs(model: nn.Module, example_inputs: Any, fqns: Sequence[str]) -> dict[str, Tensor]:
    """The input each named layer receives on `example_inputs` (first call), via forward hooks."""
    seen: dict[str, Tensor] = {}

    def hook(fqn: str) -> Callable[..., None]:
        def record(_module: nn.Module, inputs: tuple[Any, ...]) -> None:
            seen.setdefault(fqn, inputs[0].detach().clone())

        return record

    run_with_hooks(model, example_inputs, {f: hook(f) for f in fqns}, pre=True)
    return seen


def measure_latency_table(
    model: nn.Module,
    config: FrozenConfig,
    levels: Sequence[float],
    example_inputs: Any,
    *,
    repeats: int = 50,
    warmup: int = 5,
    threads: int | None = None,
    progress: bool = False,
) -> LatencyTable:
    """Time every prunable unit of `model` alone at each level on this device; does not mutate.

    Args:
        model: the dense model.
        config: the family the allocation will use: a mask config (units are layers, each
            timed alone on its real input with its weights zeroed) or a `ChannelConfig` (units
            are coupled channel groups; every layer the group touches, including those whose
            inputs it narrows, is timed on its real input with the group removed).
        levels: the levels of the sensitivity scan.
        example_inputs: the inputs to serve (e.g. batch 1); each layer is timed on the input
            it receives from them.
        repeats, warmup, threads: as in `prunekit.measure.bench.measure_latency`.
        progress: show a progress bar over units.

    Returns:
        A `LatencyTable` to pass to `prunekit.allocate(..., latency=)`.
    """
    levels = [float(lv) for lv in levels]
    model_ms = _cost_ms(measure_latency({"model": model}, example_inputs, repeats=repeats, warmup=warmup,
                                        threads=threads)["model"])
    used = threads if threads is not None else torch.get_num_threads()
    if not isinstance(config, (MaskConfig, PerLayer)):
        group_ms, group_levels_ms, reference = _time_groups(model, config, levels, example_inputs, repeats, warmup,
                                                            threads, progress)
        return LatencyTable(list(group_ms), levels, group_ms, group_levels_ms, model_ms, "group", used, reference)
    units = {f: [f] for f in resolve(model, config)}
    modules = dict(model.named_modules())
    inputs = _layer_inputs(model, example_inputs, sorted({f for fs in units.values() for f in fs}))
    dense_ms: dict[str, float] = {}
    latency_ms: dict[str, list[float]] = {}
    reference_ms: dict[str, float] = {}
    for unit, fqns in progress_bar(list(units.items()), "latency table", progress):
        totals = [0.0] * (len(levels) + 1)
        references: list[float] = []
        for fqn in fqns:
            # every variant of a layer timed together, interleaved, each bound to its own input
            variants = {"model": _Whole(model, example_inputs), "dense": _Bound(modules[fqn], inputs[fqn])}
            for i, level in enumerate(levels):
                variants[str(i)] = _Bound(zeroed_variant(modules[fqn], level), inputs[fqn])
            timed = measure_latency(variants, None, repeats=repeats, warmup=warmup, threads=threads)
            references.append(_cost_ms(timed.pop("model")))
            for j, name in enumerate(timed):
                totals[j] += _cost_ms(timed[name])
        dense_ms[unit], latency_ms[unit] = totals[0], totals[1:]
        reference_ms[unit] = sum(references) / len(references)
    return LatencyTable(list(units), levels, dense_ms, latency_ms, model_ms, "layer", used, reference_ms)


def _time_groups(
    model: nn.Module, config: FrozenConfig, levels: list[float], example_inputs: Any, repeats: int, warmup: int,
    threads: int | None, progress: bool,
) -> tuple[dict[str, float], dict[str, list[float]], dict[str, float]]:
    """Time the layers a channel group touches, dense and with the group removed at each level.

    A group's channels narrow its own layers' outputs and the inputs of the layers it feeds;
    all of them (every module owning a member tensor) are timed together on the inputs they
    receive in the dense model and in each pruned copy. Timing only those layers, instead of
    the whole model, keeps a small group's saving above the timer's noise.
    """
    pruner = GroupPruner(model, config, example_inputs)
    dense_ms: dict[str, float] = {}
    latency_ms: dict[str, list[float]] = {}
    reference_ms: dict[str, float] = {}
    for name, group in progress_bar(list(pruner.groups.items()), "latency table", progress):
        touched = sorted({fqn.rpartition(".")[0] for fqn, _ in group.members})
        variants = {"model": _Whole(model, example_inputs), "dense": _Layers(model, example_inputs, touched)}
        for i, level in enumerate(levels):
            variants[str(i)] = _Layers(pruner.pruned(name, level), example_inputs, touched)
        timed = measure_latency(variants, None, repeats=repeats, warmup=warmup, threads=threads)
        reference_ms[name] = _cost_ms(timed["model"])
        dense_ms[name] = _cost_ms(timed["dense"])
        latency_ms[name] = [_cost_ms(timed[str(i)]) for i in range(len(levels))]
    return dense_ms, latency_ms, reference_ms


def _cost_ms(latency: Latency) -> float:
    """A table entry: the fastest of the interleaved calls, not their median.

    Other processes only ever add time. A layer that runs in a millisecond is either
    preempted for a whole scheduler slice (tens of ms) or not at all, so on a busy machine
    most of its calls can be hit and the median (even the 10th percentile) is the stall, not
    the layer (measured at load 19: a group of ~2 ms read 33 ms dense and 2.3 ms pruned by
    the median, 24.7 ms dense by the 10th percentile). The fastest call is what the layer
    costs when it runs, as `timeit` advises; every entry, the whole-model references
    included, uses the same statistic.
    """
    times = list(latency.times_ms)
    return min(times) if times else float(latency.latency_ms_p50)


class _Whole(nn.Module):
    """The whole model on its example inputs, timed beside a unit's variants as the reference."""

    def __init__(self, model: nn.Module, example_inputs: Any) -> None:
        super().__init__()
        self.model, self.example_inputs = model, example_inputs
        self.training = model.training  # restored recursively after timing: keep the model's

    def forward(self, _ignored: Any = None) -> Any:
        return call_model(self.model, self.example_inputs)


class _Layers(nn.Module):
    """Some layers of a model, each run on the input it receives from the model's example inputs."""

    def __init__(self, model: nn.Module, example_inputs: Any, fqns: list[str]) -> None:
        super().__init__()
        modules = dict(model.named_modules())
        inputs = _layer_inputs(model, example_inputs, fqns)
        self.calls = [(modules[f], inputs[f]) for f in fqns if f in inputs]
        self.held = nn.ModuleList(m for m, _ in self.calls)  # so eval()/parameters() reach them
        # measure_latency restores *our* mode recursively afterwards: make it the model's mode
        self.training = model.training

    def forward(self, _ignored: Any = None) -> Any:
        return [layer(x) for layer, x in self.calls]


class _Bound(nn.Module):
    """A layer bound to its own input, so variants with different input widths time together."""

    def __init__(self, layer: nn.Module, x: Tensor) -> None:
        super().__init__()
        self.layer, self.x = layer, x  # measure_latency passes None as the input
        self.training = layer.training  # restored recursively after timing: keep the layer's

    def forward(self, _ignored: Any = None) -> Tensor:
        return self.layer(self.x)


def zeroed_variant(layer: nn.Module, level: float) -> nn.Module:
    """A copy of `layer` with its smallest-magnitude `level` fraction of weights zeroed (what a
    mask config's unit is timed as).

    Raises:
        ConfigError: the layer has no weight tensor.
    """
    pruned = copy.deepcopy(layer).eval()
    weight = pruned.weight
    if not isinstance(weight, Tensor):
        raise ConfigError(f"layer {type(layer).__name__} has no weight tensor to prune")
    with torch.no_grad():
        flat = weight.abs().flatten()
        k = round(level * flat.numel())
        if k:
            weight.mul_(weight.abs() > flat.kthvalue(k).values)
    return pruned
