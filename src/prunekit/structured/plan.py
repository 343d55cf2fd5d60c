"""`ChannelPlan`: which rows/columns of which tensors go; printable, JSON-serialisable, atomic.

The plan is pure data (tensor FQN -> dim -> kept indices, plus what it removes and saves), so
it replays on a freshly built dense model: that is how a structurally pruned checkpoint is
reloaded without pickling the module (timm's `_prune.py` manifest, as a plan).
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, NonNegativeInt, model_validator
from torch import Tensor, nn

from prunekit.config import config_from_dict, config_to_dict
from prunekit.core.counting import count_flops, count_params
from prunekit.core.masks import masked_modules
from prunekit.core.plan import PlanContext, register_method
from prunekit.core.targets import matches, protected_layers
from prunekit.errors import ConfigError, PlanError, UnsupportedLayerError
from prunekit.storage.files import JsonDocument, validate_document
from prunekit.structured.config import ChannelConfig
from prunekit.structured.groups import DependencyGraph, Group, analyze, warn_barriers
from prunekit.structured.hf import update_config
from prunekit.structured.layers import get_layer_handler, is_attention_holder, owner_of
from prunekit.structured.rollback import restore, snapshot
from prunekit.structured.select import ScoreInputs, get_group_criterion, select_units, taylor_grads
from prunekit.structured.trace import TracedModel, trace

log = logging.getLogger(__name__)
FORMAT = "prunekit.channel_plan"
FORMAT_VERSION = 1


class _PlanTensor(BaseModel):
    """One tensor of a plan document: its dense shape and, per dim, the indices kept."""

    model_config = ConfigDict(extra="forbid")
    shape: list[NonNegativeInt]
    keep: dict[NonNegativeInt, list[NonNegativeInt]]

    @model_validator(mode="after")
    def _indices_in_range(self) -> _PlanTensor:
        for dim, kept in self.keep.items():
            if dim >= len(self.shape):
                raise ValueError(f"dim {dim} is outside shape {self.shape}")
            if any(i >= self.shape[dim] for i in kept) or len(set(kept)) != len(kept):
                raise ValueError(f"kept indices of dim {dim} must be distinct and below {self.shape[dim]}")
        return self


class _PlanDocument(BaseModel):
    """The JSON schema of a saved `ChannelPlan` (checked before anything is built from it)."""

    format: Literal["prunekit.channel_plan"]
    version: Literal[1]
    config: dict[str, Any]
    tensors: dict[str, _PlanTensor]
    groups: list[dict[str, Any]] = []
    stats: dict[str, Any] = {}


@dataclass
class ChannelPlan(JsonDocument):
    """A structured pruning plan: per tensor, per dim, the indices kept.

    Attributes:
        config: the config it was planned from.
        keep: tensor FQN -> {dim: kept indices}.
        shapes: tensor FQN -> shape before pruning (checked before anything is changed).
        groups: one row per pruned group: name, units, units removed, unit width.
        stats: params/FLOPs before and after (filled by the planner when inputs are known).
    """

    document_name = "channel plan"
    document_error = PlanError

    config: ChannelConfig
    keep: dict[str, dict[int, list[int]]] = field(default_factory=dict)
    shapes: dict[str, list[int]] = field(default_factory=dict)
    groups: list[dict[str, Any]] = field(default_factory=list)
    stats: dict[str, int] = field(default_factory=dict)

    # ---------------------------------------------------------------- describe

    def summary(self) -> str:
        """Groups, units removed, and params/FLOPs before -> after."""
        rows = [f"ChannelPlan: ratio {self.config.ratio}, criterion {self.config.criterion}, scope {self.config.scope}"]
        width = max([len(g["name"]) for g in self.groups] + [5])
        rows.append(f"  {'group':<{width}}  units  removed  unit")
        for g in self.groups:
            unit = "head" if g.get("kind") == "head" else "channel" if g["width"] == 1 else f"{g['width']} rows"
            rows.append(f"  {g['name']:<{width}}  {g['units']:>5}  {g['removed']:>7}  {unit}")
        removed = sum(g["removed"] for g in self.groups)
        rows.append(f"  {len(self.groups)} groups, {removed} units removed")
        s = self.stats
        if "params_before" in s:
            rows.append(
                f"  params {s['params_before']:,} -> {s['params_after']:,} "
                f"({s['params_after'] / max(s['params_before'], 1):.1%})"
            )
        if "flops_before" in s:
            rows.append(
                f"  FLOPs  {s['flops_before']:,} -> {s['flops_after']:,} "
                f"({s['flops_after'] / max(s['flops_before'], 1):.1%})"
            )
        return "\n".join(rows)

    def __str__(self) -> str:
        return self.summary()

    # ---------------------------------------------------------------- serialise

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able data, tagged with format and version."""
        return {
            "format": FORMAT,
            "version": FORMAT_VERSION,
            "config": config_to_dict(self.config),
            "tensors": {
                k: {"shape": self.shapes[k], "keep": {str(d): v for d, v in dims.items()}}
                for k, dims in self.keep.items()
            },
            "groups": self.groups,
            "stats": self.stats,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ChannelPlan:
        """Rebuild a plan from `to_dict` output; raises `PlanError` on anything malformed."""
        if not isinstance(data, dict) or data.get("format") != FORMAT or data.get("version") != FORMAT_VERSION:
            raise PlanError(f"not a {FORMAT} v{FORMAT_VERSION} document")
        validate_document(data, _PlanDocument, "channel plan", PlanError)
        try:
            config = config_from_dict(data["config"], "plan.config")
            keep = {k: {int(d): [int(i) for i in v] for d, v in t["keep"].items()} for k, t in data["tensors"].items()}
            shapes = {k: [int(s) for s in t["shape"]] for k, t in data["tensors"].items()}
        except (KeyError, TypeError, ValueError, AttributeError) as err:
            raise PlanError(f"malformed channel plan: {err!r}") from None
        if not isinstance(config, ChannelConfig):
            raise PlanError(f"plan.config is a {type(config).__name__}, not a ChannelConfig")
        return cls(config, keep, shapes, list(data.get("groups", [])), dict(data.get("stats", {})))

    # ---------------------------------------------------------------- apply

    def apply(self, model: nn.Module) -> nn.Module:
        """Remove the planned channels from `model` (mutates, returns it); all or nothing.

        Raises:
            PlanError: a tensor is missing or has another shape than planned (e.g. the model
                is already pruned), or a layer cannot be updated; the model is left unchanged.
        """
        tensors = _tensors_by_fqn(model)
        new = self._sliced(tensors)
        modules = dict(model.named_modules())
        touched = {owner_of(k)[0] for k in new}
        # A parametrized tensor (weight_norm's original0/1) lives on a ParametrizationList; the
        # layer it parametrizes has the shape attributes to refresh.
        touched |= {layer.partition(".parametrizations.")[0] for layer in touched if ".parametrizations." in layer}
        holders = [m for m in modules.values() if is_attention_holder(m)]
        saved = snapshot(model, [modules[t] for t in touched] + holders)
        try:
            with torch.no_grad():
                for key, value in new.items():
                    _assign(model, key, value)
                for fqn in sorted(touched):
                    handler = get_layer_handler(modules[fqn])
                    if handler is None:
                        raise PlanError(f"layer {fqn!r} ({type(modules[fqn]).__name__}) has no structured handler")
                    handler.update(modules[fqn])
                for holder in holders:
                    get_layer_handler(holder).update(holder)  # type: ignore[union-attr]
                update_config(model)
        except Exception as err:
            restore(saved)
            if isinstance(err, PlanError):
                raise
            raise PlanError(f"applying the channel plan failed and was rolled back: {err}") from err
        return model

    def _sliced(self, tensors: dict[str, Tensor]) -> dict[str, Tensor]:
        """The new tensors, computed and checked before anything is mutated."""
        out = {}
        for key, dims in self.keep.items():
            t = tensors.get(key)
            if t is None:
                raise PlanError(f"plan names tensor {key!r}, which this model does not have")
            if list(t.shape) != self.shapes[key]:
                raise PlanError(
                    f"tensor {key!r} is {tuple(t.shape)}, the plan expects {tuple(self.shapes[key])} "
                    "(already pruned, or another model?)"
                )
            value = t.detach()
            for dim, idx in dims.items():
                if idx and (min(idx) < 0 or max(idx) >= t.shape[dim]):
                    raise PlanError(f"tensor {key!r}: kept index out of range on dim {dim}")
                value = value.index_select(dim, torch.as_tensor(idx, dtype=torch.long, device=t.device))
            out[key] = value.clone()
        return out


def replay(plan_data: dict[str, Any], model: nn.Module) -> nn.Module:
    """Apply a saved plan to `model` unless it already has the pruned shapes (mutates, returns).

    Raises:
        PlanError: the model has neither the dense nor the pruned shapes the plan describes.
    """
    plan = ChannelPlan.from_dict(plan_data)
    tensors = _tensors_by_fqn(model)
    key = next(iter(plan.keep), None)
    if key is None or key not in tensors or list(tensors[key].shape) != plan.shapes[key]:
        return model  # already pruned (or not this model): load's shape check says which
    return plan.apply(model)


def _tensors_by_fqn(model: nn.Module) -> dict[str, Tensor]:
    return dict(model.named_parameters(remove_duplicate=False)) | dict(model.named_buffers(remove_duplicate=False))


def _assign(model: nn.Module, key: str, value: Tensor) -> None:
    layer, name = owner_of(key)
    module = model.get_submodule(layer)
    if name in module._parameters:
        old = module._parameters[name]
        param = nn.Parameter(value, requires_grad=old.requires_grad)  # type: ignore[union-attr]
        if old is not None and old.grad is not None:
            param.grad = None  # gradients of removed channels are meaningless; start clean
        # Tied weights (GPT-2's lm_head and wte): every module holding the same tensor gets it.
        for other in model.modules():
            for pname, p in other._parameters.items():
                if p is old:
                    other._parameters[pname] = param
    else:
        module._buffers[name] = value


# --------------------------------------------------------------------------------------------
# Planning.


def excluded_layers(model: nn.Module, patterns: tuple[str, ...]) -> list[str]:
    """FQNs of `model`'s modules matched by `patterns` (FQNs or "re:<regex>"), in pattern order,
    then the layers `protected_layers` keeps dense by default (a language model's output head,
    a layer tied to an embedding): their outputs (the vocabulary) never shrink.

    Raises:
        ConfigError: a pattern matches no module (a typo must not silently prune everything).
    """
    names = [n for n, _ in model.named_modules() if n]
    out = []
    for pattern in patterns:
        hits = [n for n in names if matches(pattern, n)]
        if not hits:
            sample = ", ".join(names[:6]) + (", ..." if len(names) > 6 else "")
            raise ConfigError(f"ChannelConfig.exclude: {pattern!r} matches no layer (layers: {sample})")
        out += hits
        out += [n for n in names if any(n.startswith(f"{h}.parametrizations.") for h in hits)]
    for fqn, why in protected_layers(model).items():
        if fqn not in out:
            log.debug("layer %r: output channels kept (%s)", fqn, why)
            out.append(fqn)
    return out


def build_plan(
    model: nn.Module, config: ChannelConfig, graph: DependencyGraph, removed: list[np.ndarray]
) -> ChannelPlan:
    """Turn per-group removed unit indices into per-tensor kept indices."""
    drop: dict[tuple[str, int], set[int]] = {}
    rows = []
    for group, gone in zip(graph.groups, removed, strict=True):
        width = min(len(group.positions[m][0]) for m in group.members)
        rows.append(
            {"name": group.name, "units": group.size, "removed": int(len(gone)), "width": width, "kind": group.kind}
        )
        for member in group.members:
            for u in gone:
                drop.setdefault(member, set()).update(int(i) for i in group.positions[member][u])
    plan = ChannelPlan(config, groups=rows)
    for (fqn, dim), dropped in sorted(drop.items()):
        if not dropped:
            continue
        size = graph.sizes[fqn][dim]
        plan.keep.setdefault(fqn, {})[dim] = [i for i in range(size) if i not in dropped]
        plan.shapes[fqn] = list(graph.sizes[fqn])
    return plan


def _scores(model: nn.Module, config: ChannelConfig, groups: list[Group], ctx: PlanContext) -> list[np.ndarray]:
    info = get_group_criterion(config.criterion)
    tensors = _tensors_by_fqn(model)
    grads = None
    if info.needs_data:
        if ctx.data is None:
            raise ConfigError(f"criterion {config.criterion!r} needs a few batches of data: pass data=...")
        grads = taylor_grads(model, ctx.data, tensors)
    members = {m[0] for g in groups for m in g.members}  # weights and norm statistics (running_var)
    for key, tensor in tensors.items():
        if key in members and tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise PlanError(
                f"tensor {key!r} has NaN/Inf values; cannot rank channels of a corrupt model "
                "(a diverged run or a bad checkpoint?)"
            )
    generator = ctx.generator or torch.Generator().manual_seed(config.seed)
    inputs = ScoreInputs(tensors, dict(model.named_modules()), grads, generator)
    return [np.asarray(info.fn(g, inputs), dtype=np.float64) for g in groups]


_PASSES = 3  # plan, then re-plan at most twice with the ops whose spelled sizes broke the run


@register_method(ChannelConfig, per_layer=False)
def plan_channels(model: nn.Module, config: ChannelConfig, fqns: list[str] | None, ctx: PlanContext) -> ChannelPlan:
    """Trace, find coupled groups, score, select: a `ChannelPlan` (the model is not mutated).

    The plan is applied to a copy and run on the example inputs. Shapes are specialised in
    the trace, so a size written as a number in the source (`x.view(b, 128)`) and one computed
    from a shape look alike; if the pruned copy fails to run, the ops that spell sizes where
    channels went become named barriers and planning runs again.
    """
    masked = list(masked_modules(model))
    if masked:
        raise ConfigError(
            f"the model has masks attached (e.g. {masked[0]!r}): call prunekit.finalize(model) before "
            "structured pruning"
        )
    excluded = excluded_layers(model, config.exclude)
    was_training = model.training
    model.eval()
    try:
        traced = trace(model, ctx.example_inputs)
        fixed: dict[str, str] = {}
        for _ in range(_PASSES):
            graph = analyze(model, traced, excluded, fixed=fixed, warn=False)
            plan, removed, err = _plan_once(model, config, graph, ctx)
            suspects = [n for n in graph.spelling_nodes(removed) if n not in fixed] if err else []
            if err is None or not suspects:
                break
            fixed |= {name: _spelling_reason(traced, name, err) for name in suspects}
    finally:
        model.train(was_training)
    if err is not None:  # no op spells a size where channels went: the analysis itself is wrong
        raise PlanError(f"the pruned model fails to run on the example inputs ({err}); please report it") from err
    warn_barriers(graph)
    log.info("%s", plan.summary())
    return plan


# Hugging Face model types whose structured units the channel graph cannot see, and the config that prunes them.
_OWN_CONFIG = {"mamba": "StateSpaceConfig", "falcon_mamba": "StateSpaceConfig", "mixtral": "ExpertConfig",
               "qwen2_moe": "ExpertConfig", "qwen3_moe": "ExpertConfig", "olmoe": "ExpertConfig"}


def _plan_once(
    model: nn.Module, config: ChannelConfig, graph: DependencyGraph, ctx: PlanContext
) -> tuple[ChannelPlan, list[np.ndarray], Exception | None]:
    """Select, build and self-check one plan; the error if the pruned copy fails to run."""
    if not graph.groups:
        warn_barriers(graph)
        first = f"; the first barrier is {graph.barriers[0][0]} in {graph.barriers[0][1]!r}" if graph.barriers else ""
        own = _OWN_CONFIG.get(str(getattr(getattr(model, "config", None), "model_type", "")))
        raise UnsupportedLayerError(
            f"{type(model).__name__} has no prunable channel group: no Linear/Conv output can shrink "
            f"(no such layer, every one excluded, or all behind ops prunekit does not understand{first})"
            + (f"; this family has its own structured config: prunekit.{own}" if own else "")
        )
    removed = select_units(
        graph.groups,
        _scores(model, config, graph.groups, ctx),
        config.ratio,
        config.scope,
        config.round_to,
        config.head_ratio,
    )
    plan = build_plan(model, config, graph, removed)
    pruned = plan.apply(copy.deepcopy(model))
    try:
        plan.stats = {
            "params_before": count_params(model),
            "params_after": count_params(pruned),
            "flops_before": count_flops(model, ctx.example_inputs),
            "flops_after": count_flops(pruned, ctx.example_inputs),
        }
    except Exception as err:  # the analysis promised a runnable model; the caller says what broke
        return plan, removed, err
    return plan, removed, None


def _spelling_reason(traced: TracedModel, name: str, err: Exception) -> str:
    node = next(n for n in traced.graph.nodes if n.name == name)
    sizes = [a for a in node.args[1:] if isinstance(a, (int, list, tuple))][:1]
    spelled = f"sizes {sizes[0]}" if sizes else "sizes"
    first = str(err).strip().splitlines()[0][:160] if str(err).strip() else type(err).__name__
    return (
        f"its {spelled} are fixed numbers in the trace and the pruned model failed to run ({first}); "
        "if the source writes them as numbers, compute them from the shape (or -1) to let these channels shrink"
    )
