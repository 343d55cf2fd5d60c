"""Whole pipelines timed end to end: several models per request, pruned against dense.

`allocation.pipeline` splits one latency budget over several models; this measures what the
split gave, one request (every model, one after another) per timed call.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import nn

from prunekit.core.inputs import call_model
from prunekit.errors import ConfigError
from prunekit.measure.bench import measure_latency


class _Chain(nn.Module):
    """Models run one after another, each on its own inputs (one request through the pipeline)."""

    def __init__(self, calls: list[tuple[nn.Module, Any]]) -> None:
        super().__init__()
        self.calls = calls
        self.held = nn.ModuleList(m for m, _ in calls)  # so eval()/parameters() reach them
        self.training = any(m.training for m, _ in calls)

    def forward(self, _ignored: Any = None) -> list[Any]:
        return [call_model(m, x) for m, x in self.calls]


def measure_pipeline(
    pipelines: Mapping[str, Mapping[str, tuple[nn.Module, Any]]],
    *,
    reference: str = "dense",
    repeats: int = 30,
    warmup: int = 3,
    threads: int | None = None,
) -> dict[str, Any]:
    """Time whole pipelines end to end, interleaved request by request; does not mutate.

    Each pipeline (name -> {stage name -> (model, inputs)}) runs its models one after another
    in one timed call; the pipelines alternate call by call, so load on a shared machine hits
    all alike. Parallel groups run sequentially too (on one device their branches would
    contend), so for them this is an upper bound on the critical path.

    Returns:
        {"reference", "repeats", "pipelines": name -> {"median_ms", "p99_ms", "speedup"}}, the
        speed-up being the reference's median over this pipeline's.

    Raises:
        ConfigError: no `reference` pipeline, or pipelines with different stages.
    """
    if reference not in pipelines:
        raise ConfigError(f"measure_pipeline: reference {reference!r} is not among {list(pipelines)}")
    stages = list(pipelines[reference])
    odd = [n for n, p in pipelines.items() if list(p) != stages]
    if odd:
        raise ConfigError(f"measure_pipeline: pipeline(s) {odd} do not have the reference's stages {stages}")
    chains = {n: _Chain(list(p.values())) for n, p in pipelines.items()}
    timed = measure_latency(chains, None, repeats=repeats, warmup=warmup, threads=threads)
    ref = timed[reference].latency_ms_p50
    return {"reference": reference, "repeats": repeats, "pipelines": {
        n: {"median_ms": t.latency_ms_p50, "p99_ms": t.latency_ms_p99, "speedup": ref / t.latency_ms_p50}
        for n, t in timed.items()}}
