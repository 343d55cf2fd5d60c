"""Sibling Linears fused into one kernel call: q/k/v projections, an MLP's gate and up.

At batch 1 a layer's fixed cost per call (Python, the module, tensor <-> array) is 5-10 us, as
much as a small layer's kernel: SmolLM2 decodes through 210 Linears a token. Linears that read
the very same input tensor are one Linear with their weights stacked by rows, so one call can
compute them all. `sibling_groups` finds them by running the model once; `FusedLinears` runs the
stacked kernel on the first member's call and hands each member its rows; `fuse` (the last step
of `accelerate`) times each group fused against its members' separate calls and keeps the winner.

Each member takes its rows of a result at most once, and only for the tensor object the result
was computed from; any other call recomputes. So the one thing fusion assumes is that an input
is not modified in place between its siblings' calls (`accelerate` checks the model's outputs
against dense after fusing). Like the kernels, not for use from several threads at once.
"""

from __future__ import annotations

import logging
import statistics
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from prunekit.core.inputs import run_with_hooks
from prunekit.runtime import candidates as cand
from prunekit.runtime import formats
from prunekit.runtime.decisions import LayerDecision

log = logging.getLogger(__name__)


def sibling_groups(model: nn.Module, fqns: Sequence[str], example_inputs: Any) -> list[list[str]]:
    """The groups (2 or more, in call order) of `fqns` whose forward got the same input tensor.

    A layer called more than once per forward (shared weights) is left out: its calls' inputs differ.
    """
    seen: dict[str, list[Tensor]] = {fqn: [] for fqn in fqns}

    def record(fqn: str) -> Any:
        return lambda _module, args: seen[fqn].append(args[0]) if args else None

    run_with_hooks(model, example_inputs, {fqn: record(fqn) for fqn in fqns}, pre=True)
    groups: dict[int, list[str]] = {}
    for fqn, inputs in seen.items():  # dicts keep insertion order: groups list members in call order
        if len(inputs) == 1:
            groups.setdefault(id(inputs[0]), []).append(fqn)
    return [members for members in groups.values() if len(members) > 1]


class FusedLinears:
    """One stacked kernel for several Linears; `member(i)` is the module standing in for Linear i."""

    def __init__(self, kernel: nn.Module, out_features: Sequence[int], fqns: Sequence[str]) -> None:
        if sum(out_features) != getattr(kernel, "out_features", sum(out_features)):
            raise ValueError(f"fused kernel has {kernel.out_features} outputs, members {list(out_features)}")
        self.kernel, self.fqns = kernel, list(fqns)
        bounds = [0]
        for n in out_features:
            bounds.append(bounds[-1] + n)
        self.slices = [slice(a, b) for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
        # a kernel built for the group may hand back each member's outputs as its own array
        self.split = getattr(kernel, "siblings", 1) == len(self.slices) > 1
        self._input: Tensor | None = None
        self._output: Tensor | None = None
        self._taken = [True] * len(self.slices)

    def output(self, x: Tensor, i: int) -> Tensor:
        """Linear i's output for x: computed for all members on the first call for a new x."""
        if x is not self._input or self._taken[i]:
            self._output, self._input = self.kernel(x), x
            self._taken = [False] * len(self.slices)
        self._taken[i] = True
        assert self._output is not None
        y = self._output[i] if self.split else self._output[..., self.slices[i]]
        if all(self._taken):  # every member served: drop the references
            self._input = self._output = None
        return y.contiguous()  # a no-op at batch 1 (one row: the slice is contiguous), and for split outputs

    def member(self, i: int) -> FusedLinear:
        return FusedLinear(self, i)


class FusedLinear(nn.Module):
    """Linear i of a `FusedLinears`, under that Linear's name."""

    group: FusedLinears

    def __init__(self, group: FusedLinears, index: int) -> None:
        super().__init__()
        self.index = index
        self.__dict__["group"] = group  # shared by the members: not a submodule of each
        self.fqn = group.fqns[index]
        sl = group.slices[index]
        self.out_features = sl.stop - sl.start

    def forward(self, x: Tensor) -> Tensor:
        return self.group.output(x, self.index)

    def extra_repr(self) -> str:
        others = [f for f in self.group.fqns if f != self.fqn]
        return f"{self.fqn!r}, out_features={self.out_features}, fused with {others}: {self.group.kernel.extra_repr()}"


def stacked(weights: Sequence[Tensor], biases: Sequence[Tensor | None]) -> tuple[Tensor, Tensor | None]:
    """The members' weights stacked by rows, and their biases (zeros where a member has none)."""
    weight = torch.cat([w.detach() for w in weights], dim=0)
    if all(b is None for b in biases):
        return weight, None
    parts = [torch.zeros(w.shape[0]) if b is None else b.detach().float() for w, b in zip(weights, biases, strict=True)]
    return weight, torch.cat(parts)


def _fusion_trials(
    siblings: list[list[str]],
    built: dict[str, dict[str, nn.Module]],
    infos: dict[str, cand.LayerInfo],
    by_fqn: dict[str, LayerDecision],
) -> tuple[list[list[str]], dict[str, dict[str, nn.Module]]]:
    """The sibling groups worth a try, and per member: "separate" (its choice) and "fused:<kernel>".

    A group is tried when none of its layers stayed dense, with each kernel its members chose
    built once for the stacked weight (a member's first and second best are often a noise apart).
    """
    tried, trials = [], {}
    for members in siblings:
        choices = sorted({by_fqn[f].choice for f in members})
        if "dense" in choices:
            continue
        weight, bias = stacked([infos[f].weight for f in members], [infos[f].bias for f in members])
        widths = {infos[f].weight.shape[0] for f in members}
        split = len(widths) == 1 and widths.pop() % 16 == 0  # equal widths: a kernel may write each member apart
        info = cand.LayerInfo("+".join(members), weight, bias, formats.detect_block(weight), formats.is_2_4(weight),
                              infos[members[0]].allow_int8, len(members) if split else 1)
        options = {f: {"separate": built[f][by_fqn[f].choice]} for f in members}
        for choice in choices:
            try:
                kernel = cand.get_candidate(choice)(info)
            except (RuntimeError, ValueError) as err:
                log.info("accelerate: %s cannot fuse %s: %s", choice, members, err)
                continue
            if kernel is not None:
                group = FusedLinears(kernel.eval(), [infos[f].weight.shape[0] for f in members], members)
                for i, f in enumerate(members):
                    options[f][f"fused:{choice}"] = group.member(i)
        if len(options[members[0]]) > 1:
            tried.append(members)
            trials.update(options)
    return tried, trials


def fuse(
    siblings: list[list[str]],
    built: dict[str, dict[str, nn.Module]],
    infos: dict[str, cand.LayerInfo],
    decisions: list[LayerDecision],
    batch_sizes: Sequence[int],
    measure: Callable[[dict[str, dict[str, nn.Module]], int], dict[str, dict[str, list[float]]]],
) -> dict[str, nn.Module]:
    """`accelerate`'s last step: fuse each sibling group whose stacked call is faster (updates `decisions`).

    `built` holds each layer's candidate modules and `decisions` its choice; `measure(trials,
    batch)` times the trial modules in place (fqn -> way -> ms). Returns fqn -> the `FusedLinear`
    to install, for the groups where one fused kernel (built with one of the members' chosen
    kernels) beat the separate calls at every batch size: the fastest, by total over batch sizes.
    """
    by_fqn = {d.fqn: d for d in decisions}
    groups, trials = _fusion_trials(siblings, built, infos, by_fqn)
    if not groups:
        return {}
    # per group: way ("separate", "fused:<kernel>") -> batch size -> the members' summed median ms
    totals: list[dict[str, dict[int, float]]] = [{way: {} for way in trials[g[0]]} for g in groups]
    for b in batch_sizes:
        times = measure(trials, b)
        for members, per_way in zip(groups, totals, strict=True):
            for way, ms in per_way.items():
                ms[b] = sum(statistics.median(times[f][way]) for f in members)
    installed: dict[str, nn.Module] = {}
    for members, per_way in zip(groups, totals, strict=True):
        separate = per_way["separate"]
        ways = [w for w in per_way if w != "separate"]
        winners = [w for w in ways if all(per_way[w][b] < separate[b] for b in batch_sizes)]
        best = min(winners, key=lambda w: sum(per_way[w].values())) if winners else None
        shown = per_way[best or min(ways, key=lambda w: sum(per_way[w].values()))]
        timing = ", ".join(f"b{b} {shown[b]:.3f} vs {separate[b]:.3f} ms" for b in batch_sizes)
        for fqn in members:
            d = by_fqn[fqn]
            if best:
                d.choice, d.fused_with = best.removeprefix("fused:"), [f for f in members if f != fqn]
                installed[fqn] = trials[fqn][best]
            d.reason = (d.reason + "; " if d.reason else "") + f"{'fused' if best else 'not fused'} ({timing})"
    return installed
