"""Fuzzing `prune` on random architectures: a valid pruned model or a prunekit error (issue 10, item 4).

Hypothesis builds small networks from random layer sequences (conv, depthwise and grouped
conv, linear, BatchNorm, LayerNorm, residual add, channel concat, flatten, global pooling;
widths down to 1) and prunes them with `UnstructuredConfig`, `NMConfig` and `ChannelConfig`.
Every case ends in one of two ways:

- a pruned model that passes the pinned invariants: unstructured and N:M masks hold exactly
  the planned zeros (sparsity rounds to whole weights; every group of m keeps n), the
  finalized model computes what the masked one does; a structurally pruned model keeps its
  output shape, computes what the dense model with the removed channels zeroed computes
  (`tests/structured/helpers.assert_equivalent`), and has fewer parameters exactly when the
  plan removed a unit;
- or a `PrunekitError` with a message, after which the model is unchanged.

Any other exception type fails the case, and so does a hang: each case runs under a
Hypothesis deadline and a hard `SIGALRM` time limit.
"""

from __future__ import annotations

import contextlib
import os
import signal
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import Tensor, nn

import prunekit as pk
from prunekit.core.criteria import get_criterion
from prunekit.core.masks import get_mask, masked_modules, n_pruned
from prunekit.deploy.quantize import finalized_copy
from prunekit.measure.bench import count_params
from tests.structured.helpers import assert_equivalent

FAST, SLOW = 6, int(os.environ.get("PRUNEKIT_FUZZ_EXAMPLES", "300"))  # examples per property: default / `-m slow`
BUDGETS = [pytest.param(FAST, id="fast"), pytest.param(SLOW, id="slow", marks=pytest.mark.slow)]
CASE_LIMIT_S = 60  # hard limit per case: a hang fails the test instead of stalling the suite
CASES: Counter[str] = Counter()  # "method: outcome" -> generated cases run (printed by conftest.py)


def _settings(n: int) -> settings:
    return settings(max_examples=n, deadline=timedelta(seconds=30), database=None, derandomize=n == FAST,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


class CaseTimeout(BaseException):  # noqa: N818  (BaseException: `except Exception` in prunekit cannot swallow it)
    """A fuzz case ran past its hard time limit."""


@contextlib.contextmanager
def time_limit(seconds: int) -> Iterator[None]:
    def _raise(signum: int, frame: Any) -> None:
        raise CaseTimeout(f"fuzz case ran longer than {seconds} s")

    previous = signal.signal(signal.SIGALRM, _raise)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


# --------------------------------------------------------------------------------------------
# Random architectures: a spec (list of layer tuples) interpreted by small modules.


class Residual(nn.Module):
    """x + body(x): an add that couples the body's output channels with its input's."""

    def __init__(self, body: nn.Module) -> None:
        super().__init__()
        self.body = body

    def forward(self, x: Tensor) -> Tensor:
        return x + self.body(x)


class Concat(nn.Module):
    """cat([a(x), b(x)], dim=1): the next layer's inputs come from two producers."""

    def __init__(self, a: nn.Module, b: nn.Module) -> None:
        super().__init__()
        self.a, self.b = a, b

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat([self.a(x), self.b(x)], dim=1)


class GlobalPool(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return x.mean(dim=(2, 3))


@dataclass
class Arch:
    """A random network and its input; `spec` is the readable recipe Hypothesis prints."""

    spec: list[tuple[Any, ...]]
    input_shape: tuple[int, ...]

    def build(self) -> nn.Module:
        torch.manual_seed(0)
        layers = []
        img = len(self.input_shape) == 4
        width = self.input_shape[1]
        hw = self.input_shape[2] if img else 0
        for op, *args in self.spec:
            if op == "conv":
                out, k, groups = args
                layers.append(nn.Conv2d(width, out, k, padding=k // 2, groups=groups))
                width = out
            elif op == "bn":
                layers.append(nn.BatchNorm2d(width) if img else nn.BatchNorm1d(width))
            elif op == "ln":
                layers.append(nn.LayerNorm(width))
            elif op == "relu":
                layers.append(nn.ReLU())
            elif op == "res":
                body = nn.Conv2d(width, width, 3, padding=1, groups=args[0]) if img else nn.Linear(width, width)
                layers.append(Residual(nn.Sequential(body, nn.BatchNorm2d(width)) if img and args[1] else body))
            elif op == "cat":
                a, b = args
                kind = nn.Conv2d if img else nn.Linear
                layers.append(Concat(*(kind(width, o, 1) if img else kind(width, o) for o in (a, b))))
                width = a + b
            elif op == "linear":
                layers.append(nn.Linear(width, args[0]))
                width = args[0]
            elif op == "flatten":
                layers.append(nn.Flatten())
                width, img = width * hw * hw, False
            elif op == "pool":
                layers.append(GlobalPool())
                img = False
        model = nn.Sequential(*layers).eval()
        for m in model.modules():  # non-trivial BN statistics, so zeroing a channel is visible
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 1.5)
                nn.init.uniform_(m.weight, 0.5, 1.5)
                nn.init.uniform_(m.bias, -0.5, 0.5)
        return model

    def inputs(self) -> Tensor:
        return torch.randn(self.input_shape, generator=torch.Generator().manual_seed(1))


widths = st.integers(1, 12) | st.sampled_from([4, 8, 16])  # some N:M-divisible widths
seeds = st.integers(0, 2**16) | st.integers(0, 2**16) | st.sampled_from([-1, 2**63, 2**64 - 1, 2**64, -(2**63) - 1])


@st.composite
def archs(draw: st.DrawFn) -> Arch:
    img = draw(st.booleans())
    width, side = draw(st.integers(1, 6)), draw(st.integers(1, 5))
    shape = (2, width, side, side) if img else (2, width)
    # A conv/linear first, so most cases have something to prune; what follows is free.
    spec: list[tuple[Any, ...]] = [("conv", draw(widths), draw(st.sampled_from([1, 3])), 1) if img else
                                   ("linear", draw(widths))]
    width = spec[0][1]
    for _ in range(draw(st.integers(0, 6))):
        if img:
            op = draw(st.sampled_from(["conv", "conv", "conv", "dwconv", "gconv", "bn", "relu", "res", "cat",
                                       "flatten", "pool"]))
            if op == "conv":
                spec.append(("conv", draw(widths), draw(st.sampled_from([1, 3])), 1))
            elif op == "dwconv":
                spec.append(("conv", width, 3, width))
            elif op == "gconv":
                groups = draw(st.sampled_from([g for g in (1, 2, 3, 4) if width % g == 0]))
                spec.append(("conv", groups * draw(st.integers(1, 4)), 3, groups))
            elif op == "res":
                spec.append(("res", draw(st.sampled_from([1, width])), draw(st.booleans())))
            elif op == "cat":
                spec.append(("cat", draw(widths), draw(widths)))
            elif op in ("flatten", "pool"):
                spec.append((op,))
                img = False
                if op == "flatten":
                    width *= side * side
                continue
            else:
                spec.append((op,))
        else:
            op = draw(st.sampled_from(["linear", "linear", "linear", "bn", "ln", "relu", "res", "res", "cat"]))
            if op == "linear":
                spec.append(("linear", draw(widths)))
            elif op == "res":
                spec.append(("res", 1, False))
            elif op == "cat":
                spec.append(("cat", draw(widths), draw(widths)))
            else:
                spec.append((op,))
        width = _width_after(spec[-1], width)
    if draw(st.booleans()):  # a classifier head, the usual `exclude` target
        if img:
            spec.append(("pool",))
        spec.append(("linear", draw(st.integers(1, 5))))
    return Arch(spec, shape)


def _width_after(layer: tuple[Any, ...], width: int) -> int:
    if layer[0] in ("conv", "linear"):
        return layer[1]
    if layer[0] == "cat":
        return layer[1] + layer[2]
    return width


def exclude_patterns(model: nn.Module) -> st.SearchStrategy[tuple[str, ...]]:
    names = [n for n, _ in model.named_modules() if n]
    pool = names + ["re:.*", "re:0.*", "nope", "re:(", "re:" + "(" * 300 + ")" * 300, "re:a{4294967296}"]
    return st.just(()) | st.lists(st.sampled_from(pool), max_size=2).map(tuple)


# --------------------------------------------------------------------------------------------
# The checks.


def _params(model: nn.Module) -> dict[str, Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def event(label: str) -> None:
    CASES[label] += 1


def pruned_or_error(model: nn.Module, config: Any, x: Tensor) -> nn.Module | None:
    """`prune` inside the time limit; None on a PrunekitError, after checking the model is unchanged.

    Calibration criteria (Wanda, SparseGPT) get the example batch as their data.
    """
    before = _params(model)
    data = [x] if get_criterion(config.criterion).needs_data else None
    try:
        with time_limit(CASE_LIMIT_S):
            out = pk.prune(model, config, x, data=data)
        event(f"{type(config).__name__}: pruned")
        return out
    except pk.PrunekitError as err:
        assert str(err).strip(), f"{type(err).__name__} raised without a message"
        event(f"{type(config).__name__}: refused, {type(err).__name__}")
        assert not masked_modules(model), "a failed prune left masks attached"
        after = model.state_dict()
        assert after.keys() == before.keys()
        for k, v in before.items():
            assert torch.equal(after[k], v), f"a failed prune changed {k}"
        return None


def check_finalize_matches_masked(model: nn.Module, x: Tensor, dense_out: Tensor) -> None:
    final = finalized_copy(model)  # not finalize(deepcopy(...)): that breaks the original (see its docstring)
    assert not masked_modules(final)
    with torch.no_grad():
        masked_out, final_out = model(x), final(x)
    assert masked_out.shape == final_out.shape == dense_out.shape
    torch.testing.assert_close(final_out, masked_out, rtol=0, atol=0)


def _chooser(data: st.DataObject, label: str, options: list[Any]) -> Any:
    return data.draw(st.sampled_from(options), label=label)


@pytest.mark.parametrize("budget", BUDGETS)
def test_unstructured_on_random_architectures(budget: int) -> None:
    @_settings(budget)
    @given(archs(), st.data())
    def check(arch: Arch, data: st.DataObject) -> None:
        model, x = arch.build(), arch.inputs()
        with torch.no_grad():
            dense_out = model(x)
        sparsity = data.draw(st.sampled_from([0.0, 0.3, 0.5, 0.9, 0.999]) | st.floats(0, 0.99), label="sparsity")
        scope = _chooser(data, "scope", ["global", "layer"])
        criterion = _chooser(data, "criterion", ["l1", "l1", "random", "wanda", "sparsegpt"])
        kwargs = {"sparsity": sparsity, "scope": scope, "criterion": criterion,
                  "exclude": data.draw(exclude_patterns(model), label="exclude"),
                  "seed": data.draw(seeds, label="seed")}
        config = outcome_config(pk.UnstructuredConfig, kwargs)
        if config is None or pruned_or_error(model, config, x) is None:
            return
        masks = {fqn: get_mask(m).mask for fqn, m in masked_modules(model).items()}  # type: ignore[union-attr]
        assert masks, "prune succeeded but attached no mask"
        zeros = {fqn: int((~m).sum()) for fqn, m in masks.items()}
        if get_criterion(criterion).needs_data and scope == "layer":  # rounded per output row
            for fqn, m in masks.items():
                assert abs(zeros[fqn] - sparsity * m.numel()) <= m.shape[0], fqn
        elif scope == "layer":
            for fqn, m in masks.items():
                assert zeros[fqn] == n_pruned(m.numel(), sparsity), fqn
        else:
            assert sum(zeros.values()) == n_pruned(sum(m.numel() for m in masks.values()), sparsity)
        measured = pk.sparsity(model)
        for fqn in masks:  # the weights read as zero where the mask says (init has no zeros; SparseGPT may add)
            seen = round(measured.layers[fqn] * measured.numel[fqn])
            assert seen >= zeros[fqn] if criterion == "sparsegpt" else seen == zeros[fqn], fqn
        check_finalize_matches_masked(model, x, dense_out)

    check()


@pytest.mark.parametrize("budget", BUDGETS)
def test_nm_on_random_architectures(budget: int) -> None:
    @_settings(budget)
    @given(archs(), st.data())
    def check(arch: Arch, data: st.DataObject) -> None:
        model, x = arch.build(), arch.inputs()
        with torch.no_grad():
            dense_out = model(x)
        m = _chooser(data, "m", [2, 3, 4, 8])
        n = data.draw(st.integers(1, m - 1), label="n")
        kwargs = {"n": n, "m": m, "indivisible": _chooser(data, "indivisible", ["skip", "skip", "error"]),
                  "criterion": _chooser(data, "criterion", ["l1", "l1", "random", "wanda", "sparsegpt"]),
                  "exclude": data.draw(exclude_patterns(model), label="exclude")}
        config = outcome_config(pk.NMConfig, kwargs)
        if config is None or pruned_or_error(model, config, x) is None:
            return
        masked = masked_modules(model)
        assert masked, "prune succeeded but attached no mask"
        report = pk.check_nm(model, n, m, layers=list(masked))
        assert report.ok and not report.skipped, str(report)
        for fqn, module in masked.items():  # exactly n kept per group: N:M, not just "at most"
            keep = get_mask(module).mask  # type: ignore[union-attr]
            per_group = (keep.movedim(1, -1) if keep.dim() > 2 else keep).reshape(-1, m).sum(dim=1)
            assert bool((per_group == n).all()), fqn
        check_finalize_matches_masked(model, x, dense_out)

    check()


@pytest.mark.parametrize("budget", BUDGETS)
def test_channels_on_random_architectures(budget: int) -> None:
    @_settings(budget)
    @given(archs(), st.data())
    def check(arch: Arch, data: st.DataObject) -> None:
        model, x = arch.build(), arch.inputs()
        with torch.no_grad():
            dense_out = model(x)
        kwargs = {"ratio": data.draw(st.sampled_from([0.0, 0.3, 0.5, 0.99]) | st.floats(0, 0.99), label="ratio"),
                  "scope": _chooser(data, "scope", ["layer", "global"]),
                  "criterion": _chooser(data, "criterion", ["l1", "l2", "random", "bn_scale"]),
                  "round_to": _chooser(data, "round_to", [1, 1, 2, 8]),
                  "exclude": data.draw(exclude_patterns(model), label="exclude"),
                  "seed": data.draw(seeds, label="seed")}
        config = outcome_config(pk.ChannelConfig, kwargs)
        if config is None:
            return
        before = _params(model)
        try:
            with time_limit(CASE_LIMIT_S):
                plan = pk.plan(model, config, x)
                pruned = assert_equivalent(model, plan, x)
        except pk.PrunekitError as err:
            assert str(err).strip(), f"{type(err).__name__} raised without a message"
            detail = f": {str(err)[:70]}" if isinstance(err, pk.PlanError) else ""
            event(f"ChannelConfig: refused, {type(err).__name__}{detail}")
            return
        finally:  # `plan` never mutates, whatever it ends in
            assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())
        with torch.no_grad():
            assert pruned(x).shape == dense_out.shape
        removed = sum(g["removed"] for g in plan.groups)
        event("ChannelConfig: pruned" if removed else "ChannelConfig: planned, nothing removed")
        # Fewer parameters exactly when a unit went; otherwise the plan's groups say why (all kept).
        assert (count_params(pruned) < count_params(model)) == (removed > 0), plan.summary()
        assert plan.stats["params_after"] == count_params(pruned)

    check()


def outcome_config(cls: type, kwargs: dict[str, Any]) -> Any:
    try:
        return cls(**kwargs)
    except pk.ConfigError as err:
        assert str(err).strip()
        event(f"{cls.__name__}: config refused")
        return None
