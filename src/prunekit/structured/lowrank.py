"""Low-rank factorization as a method: `LowRankConfig`, its `LowRankPlan`, and the planning.

Each selected Linear or Conv2d becomes two thinner layers of rank r (the SVD and the pair are
`factorize`). The rank per layer comes from a rule: a fixed rank or rank ratio, the energy
(share of squared singular values) to keep, or a reduction of the layer's weights; a layer
whose pair would not be smaller is left dense and the plan says so. The plan is pure data
(layer FQN -> rank) and replays on a freshly built dense model, as `ChannelPlan` does.
"""

from __future__ import annotations

import copy
import logging
import math
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal, cast

import torch
from pydantic import BaseModel, ConfigDict, Field, NonNegativeInt, PositiveInt, field_validator, model_validator
from torch import Tensor, nn

from prunekit.config import FrozenConfig, config_from_dict, config_to_dict, recipe_type
from prunekit.core.counting import count_flops, count_params
from prunekit.core.inputs import run_with_hooks
from prunekit.core.masks import get_mask, masked_modules
from prunekit.core.plan import PlanContext, register_method
from prunekit.core.targets import check_finite_weight, tied_tensors
from prunekit.errors import ConfigError, PlanError, UnsupportedLayerError
from prunekit.storage.files import JsonDocument, validate_document
from prunekit.structured.factorize import FactorizedLayer, energy_rank, factorize, weight_matrix, why_not_factorizable

log = logging.getLogger(__name__)
FORMAT = "prunekit.lowrank_plan"
FORMAT_VERSION = 1
_MODES = ("energy", "rank", "rank_ratio", "reduction")


@recipe_type
class LowRankConfig(FrozenConfig):
    """Replace Linear and Conv2d layers by two thinner layers from a truncated SVD.

    Give exactly one of `energy`, `rank`, `rank_ratio`, `reduction`. A layer whose pair would
    have as many weights (and FLOPs) as the layer itself is left dense, named in the plan.

    Args:
        energy: the smallest r keeping this fraction of the weight's sum of squared singular
            values, in (0, 1].
        rank: the same r for every layer; must be below min(in, out) of each (in counts
            in_channels * kh * kw for a conv).
        rank_ratio: r = floor(rank_ratio * min(in, out)), at least 1; in (0, 1).
        reduction: the fraction of each layer's weights (= its FLOPs) removed, in [0, 1):
            r = round((1 - reduction) * in * out / (in + out)). This is the family's level
            (`with_level`), so sensitivity scans and `allocate` speak in params/FLOPs saved.
        round_to: r is rounded up to a multiple of this (e.g. 8 for SIMD-friendly widths).
        exclude: layer FQNs or "re:<regex>" left dense.

    Example:
        >>> LowRankConfig(energy=0.9, exclude=["head"]).energy
        0.9
    """

    energy: float | None = Field(default=None, gt=0.0, le=1.0)
    rank: int | None = Field(default=None, ge=1)
    rank_ratio: float | None = Field(default=None, gt=0.0, lt=1.0)
    reduction: float | None = Field(default=None, ge=0.0, lt=1.0)
    round_to: int = Field(default=1, ge=1)
    exclude: tuple[str, ...] = ()

    @field_validator("exclude", mode="before")
    @classmethod
    def _as_tuple(cls, value: object) -> object:
        return tuple(value) if isinstance(value, list) else value

    @model_validator(mode="after")
    def _one_mode(self) -> LowRankConfig:
        given = [m for m in _MODES if getattr(self, m) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of {', '.join(_MODES)}; got {given or 'none'}")
        return self

    def with_level(self, level: float) -> LowRankConfig:
        """A copy removing `level` of each layer's weights and FLOPs (the `reduction` mode)."""
        data = {k: getattr(self, k) for k in type(self).model_fields} | dict.fromkeys(_MODES)
        return LowRankConfig(**(data | {"reduction": level}))

    def as_layer_rule(self) -> LowRankConfig:
        """This config as the rule for one named layer: nothing excluded."""
        return self.model_copy(update={"exclude": ()})


# --------------------------------------------------------------------------------------------
# The plan.


@dataclass(frozen=True)
class Factorized:
    """One planned layer: its dense weight shape, the rank, and what that costs and keeps."""

    fqn: str
    kind: Literal["linear", "conv2d"]
    shape: tuple[int, ...]
    rank: int
    rule: str = ""  # how the rank was chosen ("energy 0.9", "rank 32")
    energy_kept: float | None = None
    flops: tuple[int, int] | None = None  # this layer's FLOPs before, after (with example inputs)

    @property
    def params(self) -> tuple[int, int]:
        out, inner = self.shape[0], math.prod(self.shape[1:])
        return out * inner, self.rank * (out + inner)


class _Layer(BaseModel):
    model_config = ConfigDict(extra="forbid")
    fqn: str
    kind: Literal["linear", "conv2d"]
    shape: list[PositiveInt]
    rank: PositiveInt
    rule: str = ""
    energy_kept: float | None = None
    flops: tuple[NonNegativeInt, NonNegativeInt] | None = None

    @model_validator(mode="after")
    def _fits(self) -> _Layer:
        if len(self.shape) != (2 if self.kind == "linear" else 4):
            raise ValueError(f"layer {self.fqn!r}: a {self.kind} weight cannot have shape {self.shape}")
        if self.rank >= min(self.shape[0], math.prod(self.shape[1:])):
            raise ValueError(f"layer {self.fqn!r}: rank {self.rank} is not below min(out, in) of {self.shape}")
        return self


class _Document(BaseModel):
    """The JSON schema of a saved `LowRankPlan` (checked before anything is built from it)."""

    model_config = ConfigDict(extra="forbid")
    format: Literal["prunekit.lowrank_plan"]
    version: Literal[1]
    config: dict[str, Any] | None = None
    layers: list[_Layer]
    skipped: dict[str, str] = {}
    stats: dict[str, int] = {}


@dataclass
class LowRankPlan(JsonDocument):
    """Which layers become rank-r pairs; printable, JSON-serialisable, applied all or nothing.

    Attributes:
        config: the config it was planned from (None when several `PerLayer` rules made it).
        layers: the layers to factorize, in model order.
        skipped: layer FQN -> why it stays dense.
        stats: params (and, with example inputs, FLOPs) of the whole model before and after.

    Example:
        >>> plan = prunekit.plan(model, LowRankConfig(energy=0.9), example_inputs=x)  # doctest: +SKIP
        >>> print(plan.summary()); model = plan.apply(model)                           # doctest: +SKIP
    """

    document_name = "low-rank plan"
    document_error = PlanError

    config: LowRankConfig | None
    layers: list[Factorized] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    stats: dict[str, int] = field(default_factory=dict)

    def summary(self) -> str:
        """Per layer: rank, energy kept, params and FLOPs before -> after; skipped layers; totals."""
        rows = [f"LowRankPlan: {len(self.layers)} layers factorized, {len(self.skipped)} left dense"]
        width = max([len(e.fqn) for e in self.layers] + [5])
        rows.append(f"  {'layer':<{width}}  {'weight':<18}  {'rank':>9}  energy  params before -> after"
                    "   FLOPs before -> after")
        for e in self.layers:
            shape = "x".join(str(s) for s in e.shape)
            energy = "   -  " if e.energy_kept is None else f"{e.energy_kept:6.1%}"
            (p0, p1), flops = e.params, "" if e.flops is None else f"   {e.flops[0]:,} -> {e.flops[1]:,}"
            rank = f"{e.rank}/{min(e.shape[0], math.prod(e.shape[1:]))}"
            rows.append(f"  {e.fqn:<{width}}  {shape:<18}  {rank:>9}  {energy}  {p0:,} -> {p1:,}{flops}")
        rows += [f"  left dense {fqn}: {why}" for fqn, why in self.skipped.items()]
        for what, key in (("params", "params"), ("FLOPs ", "flops")):
            if f"{key}_before" in self.stats:
                before, after = self.stats[f"{key}_before"], self.stats[f"{key}_after"]
                rows.append(f"  {what} {before:,} -> {after:,} ({after / max(before, 1):.1%})")
        return "\n".join(rows)

    def __str__(self) -> str:
        return self.summary()

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able data, tagged with format and version."""
        layers = [{"fqn": e.fqn, "kind": e.kind, "shape": list(e.shape), "rank": e.rank, "rule": e.rule,
                   "energy_kept": e.energy_kept, "flops": None if e.flops is None else list(e.flops)}
                  for e in self.layers]
        return {"format": FORMAT, "version": FORMAT_VERSION,
                "config": None if self.config is None else config_to_dict(self.config),
                "layers": layers, "skipped": dict(self.skipped), "stats": dict(self.stats)}

    @classmethod
    def from_dict(cls, data: Any) -> LowRankPlan:
        """Rebuild a plan from `to_dict` output; `PlanError` names what is malformed."""
        doc = validate_document(data, _Document, "low-rank plan", PlanError)
        config = None if doc.config is None else config_from_dict(doc.config, "plan.config")
        if config is not None and not isinstance(config, LowRankConfig):
            raise PlanError(f"plan.config is a {type(config).__name__}, not a LowRankConfig")
        layers = [Factorized(x.fqn, x.kind, tuple(x.shape), x.rank, x.rule, x.energy_kept, x.flops)
                  for x in doc.layers]
        return cls(config, layers, dict(doc.skipped), dict(doc.stats))

    def apply(self, model: nn.Module, *, with_weights: bool = True) -> nn.Module:
        """Replace each planned layer by its factorized pair (mutates, returns `model`); all or nothing.

        Every layer is checked and every pair built before the first module is swapped.

        Args:
            with_weights: False builds zero-filled pairs of the right shapes (a replay whose
                weights come from a checkpoint next).

        Raises:
            PlanError: a layer is missing, of another type or shape than planned (already
                factorized, or another model?), masked, or holds NaN/Inf; the model is unchanged.
        """
        modules = dict(model.named_modules())
        for e in self.layers:
            _check_layer(e, modules.get(e.fqn), modules.get(e.fqn.rpartition(".")[0]) if e.fqn else None)
        swaps = [(modules[e.fqn.rpartition(".")[0]], e.fqn.rpartition(".")[2],
                  factorize(modules[e.fqn], e.rank, with_weights=with_weights)) for e in self.layers]
        done: list[tuple[nn.Module, str, nn.Module]] = []
        try:
            for parent, name, pair in swaps:
                done.append((parent, name, parent._modules[name]))  # type: ignore[arg-type]
                parent._modules[name] = pair
        except Exception as err:
            for parent, name, old in reversed(done):
                parent._modules[name] = old
            raise PlanError(f"applying the low-rank plan failed and was rolled back: {err}") from err
        return model


def _check_layer(e: Factorized, module: nn.Module | None, parent: nn.Module | None) -> None:
    if module is None or parent is None:
        raise PlanError(f"plan names layer {e.fqn!r}, which this model does not have (as a child module)")
    want = nn.Linear if e.kind == "linear" else nn.Conv2d
    if not isinstance(module, want) or getattr(module, "groups", 1) != 1:
        raise PlanError(f"layer {e.fqn!r} is a {type(module).__name__}, the plan expects a dense {want.__name__} "
                        "(already factorized, or another model?)")
    if tuple(module.weight.shape) != e.shape:
        raise PlanError(f"layer {e.fqn!r} has weight {tuple(module.weight.shape)}, the plan expects {e.shape} "
                        "(another model?)")
    if get_mask(module) is not None:
        raise PlanError(f"layer {e.fqn!r} has a mask attached: call prunekit.finalize(model) first")
    if not torch.isfinite(module.weight).all():
        raise PlanError(f"layer {e.fqn!r}: weight has NaN/Inf; cannot factorize it")


def replay_lowrank_plan(plan_data: dict[str, Any], model: nn.Module) -> nn.Module:
    """Give a freshly built dense `model` the factorized shapes of a saved plan (mutates, returns).

    What `prunekit.load(path, build_dense)` needs for a checkpoint saved with `plan=LowRankPlan`:
    the pairs are built zero-filled (the checkpoint's weights are loaded next, so no SVD runs).
    A model whose first planned layer is already a `FactorizedLayer` is returned unchanged.
    """
    plan = LowRankPlan.from_dict(plan_data)
    first = dict(model.named_modules()).get(plan.layers[0].fqn) if plan.layers else None
    if first is None or isinstance(first, FactorizedLayer):
        return model
    return plan.apply(model, with_weights=False)


# --------------------------------------------------------------------------------------------
# Planning.


def _cannot_replace(fqn: str, module: nn.Module, parents: dict[str, nn.Module], shared: Counter[int],
                    ties: dict[str, list[str]], called: dict[str, int] | None) -> str | None:
    """Why this model's `module` cannot be swapped for a pair (None if it can)."""
    parent = parents.get(fqn.rpartition(".")[0]) if fqn else None
    if parent is None:
        return "the model itself is the layer: wrap it in a module to factorize it"
    if isinstance(parent, FactorizedLayer):
        return "already part of a factorized pair"
    if isinstance(parent, nn.MultiheadAttention):
        return "nn.MultiheadAttention reads its weight directly instead of calling it"
    if shared[id(module)] > 1:
        return f"the same module sits at {shared[id(module)]} places in the model"
    if ties.get(f"{fqn}.weight"):
        return f"weight tied to {', '.join(ties[f'{fqn}.weight'])}"
    if called is not None and fqn not in called:
        return "not called on the example inputs (its weight is read directly, or the layer is unused)"
    return None


def _rank(fqn: str, config: LowRankConfig, sigma: Tensor, out: int, inner: int) -> tuple[int | None, str]:
    """(rank, rule) for one layer; rank None when the rule keeps it dense (reduction 0)."""
    full = min(out, inner)
    if config.rank is not None:
        if config.rank >= full:
            raise ConfigError(
                f"layer {fqn!r}: LowRankConfig.rank={config.rank} >= min(out {out}, in {inner}) = {full}; "
                f"use rank < {full}, rank_ratio or energy, or leave it dense (exclude, or a PerLayer rule None)"
            )
        rank, rule = config.rank, f"rank {config.rank}"
    elif config.rank_ratio is not None:
        rank, rule = max(1, math.floor(config.rank_ratio * full)), f"rank_ratio {config.rank_ratio:g}"
    elif config.reduction is not None:
        if config.reduction == 0.0:
            return None, "reduction 0"
        rank = max(1, round((1 - config.reduction) * out * inner / (out + inner)))
        rule = f"reduction {config.reduction:g}"
    else:
        rank, rule = energy_rank(sigma, config.energy), f"energy {config.energy:g}"  # type: ignore[arg-type]
    return math.ceil(rank / config.round_to) * config.round_to, rule


def _positions(model: nn.Module, fqns: list[str], example_inputs: Any) -> dict[str, int] | None:
    """Layer -> output positions per forward (tokens, or batch * H * W) on the inputs; None without inputs."""
    if example_inputs is None:
        return None
    seen: dict[str, int] = {}

    def hook(fqn: str) -> Callable[..., None]:
        def record(module: nn.Module, _inputs: Any, output: Tensor) -> None:
            seen[fqn] = seen.get(fqn, 0) + output.numel() // weight_matrix(module).shape[0]

        return record

    run_with_hooks(model, example_inputs, {f: hook(f) for f in fqns})
    return seen


def plan_layers(model: nn.Module, chosen: dict[str, LowRankConfig], ctx: PlanContext,
                config: LowRankConfig | None = None) -> LowRankPlan:
    """Choose each layer's rank and build the plan (the model is not mutated).

    With example inputs, per-layer FLOPs are counted, layers never called are left dense, and
    the plan is applied to a copy that must run (its FLOPs are measured).

    Raises:
        ConfigError: a fixed rank is not below a layer's min(out, in), or a layer is masked.
        UnsupportedLayerError: none of the chosen layers is a Linear or a dense Conv2d.
        PlanError: a weight holds NaN/Inf, or the factorized copy fails to run.
    """
    masked = [f for f in masked_modules(model) if f in chosen]
    if masked:
        raise ConfigError(f"layer {masked[0]!r} has a mask attached: call prunekit.finalize(model) first")
    parents = dict(model.named_modules())
    unsupported = {f: why for f in chosen if (why := why_not_factorizable(parents[f])) is not None}
    if len(unsupported) == len(chosen):
        listed = "; ".join(f"{f!r}: {why}" for f, why in list(unsupported.items())[:6])
        raise UnsupportedLayerError(f"no layer LowRankConfig can factorize ({listed})")
    shared = Counter(id(m) for _, m in model.named_modules(remove_duplicate=False))
    positions = _positions(model, [f for f in chosen if f not in unsupported], ctx.example_inputs)
    ties, layers, skipped = tied_tensors(model), [], dict(unsupported)
    for fqn, leaf in chosen.items():
        if fqn in unsupported:
            continue
        why = _cannot_replace(fqn, parents[fqn], parents, shared, ties, positions)
        if why is None:
            entry, why = _entry(fqn, parents[fqn], leaf, None if positions is None else positions[fqn])
            layers += [] if entry is None else [entry]
        if why is not None:
            skipped[fqn] = why
    plan = LowRankPlan(config, layers, {f: skipped[f] for f in chosen if f in skipped})
    saved = sum(e.params[0] - e.params[1] for e in layers)
    plan.stats = {"params_before": count_params(model), "params_after": count_params(model) - saved}
    if ctx.example_inputs is not None:
        try:
            factorized = plan.apply(copy.deepcopy(model))
            plan.stats |= {"flops_before": count_flops(model, ctx.example_inputs),
                           "flops_after": count_flops(factorized, ctx.example_inputs)}
        except Exception as err:
            raise PlanError(f"the factorized model fails to run on the example inputs: {err}") from err
    log.info("%s", plan.summary())
    return plan


def _entry(fqn: str, module: nn.Module, config: LowRankConfig,
           positions: int | None) -> tuple[Factorized | None, str | None]:
    """The planned layer, or None and why it stays dense."""
    check_finite_weight(fqn, module, "factorize it")
    w = weight_matrix(module).detach()
    out, inner = w.shape
    sigma = torch.linalg.svdvals(w.to(torch.float64 if w.device.type == "cpu" else torch.float32))
    rank, rule = _rank(fqn, config, sigma, out, inner)
    if rank is None:
        return None, f"{rule} keeps it dense"
    before, after = out * inner, rank * (out + inner)
    if after >= before:
        return None, f"{rule} gives rank {rank}: the pair would have {after:,} weights >= {before:,} (params and FLOPs)"
    power = sigma.double().pow(2)
    kept = float(power[:rank].sum() / power.sum()) if float(power.sum()) > 0 else 1.0
    flops = None if positions is None else (2 * before * positions, 2 * after * positions)
    kind: Literal["linear", "conv2d"] = "linear" if isinstance(module, nn.Linear) else "conv2d"
    return Factorized(fqn, kind, tuple(cast(Tensor, module.weight).shape), rank, rule, kept, flops), None


def _plan_many(model: nn.Module, groups: dict[Any, list[str]], ctx: PlanContext
               ) -> tuple[list[LowRankPlan], dict[Any, list[str]]]:
    """All `PerLayer` leaves that are `LowRankConfig`s as one plan (each layer at its own rule)."""
    mine = {leaf: fqns for leaf, fqns in groups.items() if isinstance(leaf, LowRankConfig)}
    if not mine:
        return [], groups
    order = {name: i for i, (name, _) in enumerate(model.named_modules())}
    chosen = dict(sorted(((f, leaf) for leaf, fqns in mine.items() for f in fqns), key=lambda item: order[item[0]]))
    config = next(iter(mine)) if len(mine) == 1 else None
    return [plan_layers(model, chosen, ctx, config)], {k: v for k, v in groups.items() if k not in mine}


@register_method(LowRankConfig, per_layer=True, plan_many=_plan_many)
def plan_lowrank(model: nn.Module, config: LowRankConfig, fqns: list[str] | None, ctx: PlanContext) -> LowRankPlan:
    """`prunekit.plan(model, LowRankConfig(...), example_inputs)`: a `LowRankPlan` (no mutation)."""
    return plan_layers(model, dict.fromkeys(fqns or [], config), ctx, config)
