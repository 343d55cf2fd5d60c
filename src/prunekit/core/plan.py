"""The verbs `plan` and `prune`, dispatching on the config's type (torchao's `quantize_` shape).

`plan` never mutates: it returns a plan that prints, and whose `apply` is all-or-nothing.
Each method registers how to plan it with `register_method(ConfigType)`. Mask methods
(`per_layer=True`) get the resolved layer FQNs, so `PerLayer` rules work for all of them.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from prunekit._registry import Registry
from prunekit.config import FrozenConfig, PerLayer
from prunekit.core.criteria import ScoreContext, get_criterion
from prunekit.core.distributed import attaching_masks, check_same_on_ranks, model_group, place_like, to_local
from prunekit.core.masks import base_tensor, get_mask, remove_mask, set_mask
from prunekit.core.memory import parse_memory
from prunekit.core.targets import check_finite_weight, group_by_config, resolve, tied_tensors
from prunekit.errors import ConfigError, PlanError

log = logging.getLogger(__name__)


class Plan(Protocol):
    """What every method's planner returns: something that describes and applies itself."""

    def summary(self) -> str: ...

    def apply(self, model: nn.Module) -> nn.Module: ...


@dataclass
class PlanContext:
    """Inputs a planner may need beyond the model and config."""

    example_inputs: Any = None
    data: Iterable[Any] | None = None
    generator: torch.Generator | None = None
    progress: bool = False
    stats: dict[str, dict[str, Any]] = field(default_factory=dict)
    max_memory: int | str | None = None  # bytes or "4GB": calibration passes refuse up front above it


PlanFn = Callable[[nn.Module, Any, "list[str] | None", PlanContext], Plan]
# Plans several `PerLayer` leaves of one method together (Wanda/SparseGPT leaves that differ only in
# sparsity share one calibration pass); returns their plans and the leaves it left for `plan_fn`.
PlanManyFn = Callable[[nn.Module, "dict[Any, list[str]]", PlanContext], "tuple[Sequence[Plan], dict[Any, list[str]]]"]


@dataclass(frozen=True)
class MethodInfo:
    """A registered pruning method: its config type, planner, and optional many-leaf planner."""

    config_type: type[FrozenConfig]
    plan_fn: PlanFn
    per_layer: bool
    plan_many: PlanManyFn | None = None


METHODS: Registry[type, MethodInfo] = Registry("pruning method")


def register_method(
    config_type: type[FrozenConfig], *, per_layer: bool = True, plan_many: PlanManyFn | None = None
) -> Callable[[PlanFn], PlanFn]:
    """Decorator: plan configs of `config_type` with the decorated function.

    Args:
        per_layer: the planner gets the resolved layer FQNs (mask methods), so `PerLayer` rules
            work for it; False for methods that plan the whole model (structured).
        plan_many: optional hook that plans several `PerLayer` leaves of this method at once.
    """
    return METHODS.decorator(config_type, lambda fn: MethodInfo(config_type, fn, per_layer, plan_many))


def get_method(config_type: type) -> MethodInfo:
    """The registered method for `config_type`; the error lists the known config types."""
    return METHODS.get(config_type)


def list_methods() -> list[str]:
    """Names of the config types that have a registered method."""
    return METHODS.names()


# --------------------------------------------------------------------------------------------
# Mask plans.


@dataclass
class MaskPlan:
    """Bool masks keyed by the FQN of the weight they mask ("fc1.weight"); True = keep.

    `weights` optionally holds new values for some masked tensors (methods that reconstruct
    the kept weights, like SparseGPT); `apply` writes them together with the masks, all or
    nothing. `skipped` names layers the method left dense on purpose, with the reason.
    """

    masks: dict[str, Tensor] = field(default_factory=dict)
    weights: dict[str, Tensor] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)

    def merge(self, other: MaskPlan) -> MaskPlan:
        """A plan holding both plans' masks; the layers must not overlap."""
        overlap = self.masks.keys() & other.masks.keys()
        if overlap:
            raise PlanError(f"two rules prune the same tensors: {sorted(overlap)}")
        return MaskPlan(
            {**self.masks, **other.masks},
            {**self.weights, **other.weights},
            {**self.skipped, **other.skipped},
        )

    def summary(self) -> str:
        """One line per tensor: shape and planned sparsity; then the total.

        Sharded (DTensor) masks report this rank's shards: no collective, so one rank may print.
        """
        masks = {k: to_local(m) for k, m in self.masks.items()}
        total = sum(m.numel() for m in masks.values())
        zeros = sum(int((~m).sum()) for m in masks.values())
        width = max([len(k) for k in masks] + [6])
        rows = [f"{'tensor':<{width}}  {'shape':<16}  sparsity"]
        for key, m in masks.items():
            rows.append(f"{key:<{width}}  {str(tuple(self.masks[key].shape)):<16}  {1 - m.float().mean():8.2%}")
        rows.append(f"{'total':<{width}}  {total:<16}  {zeros / max(total, 1):8.2%}")
        rows += [f"skipped {fqn}: {why}" for fqn, why in self.skipped.items()]
        if self.weights:
            rows.append(f"{len(self.weights)} tensors also get reconstructed weights")
        return "\n".join(rows)

    def __str__(self) -> str:
        return self.summary()

    def _with_ties(self, model: nn.Module) -> dict[str, Tensor]:
        """The masks, plus the same mask on every tensor tied to a masked one (a tied LM head and
        its embedding table), so every module reading the shared weight sees it pruned."""
        ties = tied_tensors(model)
        masks = dict(self.masks)
        for key, mask in self.masks.items():
            for other in ties.get(key, []):
                masks.setdefault(other, mask)
        return masks

    def apply(self, model: nn.Module) -> nn.Module:
        """Attach the masks to `model` (mutates, returns it); all or nothing.

        On a model spread over ranks this is a collective (call it on every rank): on an
        FSDP2-sharded model each rank stores its shard of each mask; on a DDP model (pass the
        wrapper) the masks' checksums are compared across ranks first.

        Raises:
            PlanError: a tensor is missing or has another shape, or the masks of a replicated
                model differ between ranks; the model is left unchanged.
        """
        group = model_group(model)
        if group is not None and not group[0]:
            check_same_on_ranks(self.masks, group[1])
        with attaching_masks(model):
            return self._apply(model)

    def _apply(self, model: nn.Module) -> nn.Module:
        modules = dict(model.named_modules())
        targets = []
        for key, mask in self._with_ties(model).items():
            fqn, _, name = key.rpartition(".")
            module = modules.get(fqn)
            weight = getattr(module, name, None) if module is not None else None
            if module is None or not isinstance(weight, Tensor):
                raise PlanError(f"plan names {key!r}, which is not a tensor of this model")
            if weight.shape != mask.shape:
                raise PlanError(f"{key!r}: mask shape {tuple(mask.shape)} != weight {tuple(weight.shape)}")
            new = self.weights.get(key)
            if new is not None and new.shape != weight.shape:
                raise PlanError(f"{key!r}: new weight shape {tuple(new.shape)} != weight {tuple(weight.shape)}")
            existing = get_mask(module, name)
            targets.append((module, name, mask, None if existing is None else existing.mask.clone(), new))
        done: list[tuple[nn.Module, str, Tensor | None, Tensor | None]] = []
        try:
            for module, name, mask, previous, new in targets:
                old: Tensor | None = None
                if new is not None:
                    base = base_tensor(module, name)
                    old = base.detach().clone()
                    with torch.no_grad():
                        base.copy_(new)
                done.append((module, name, previous, old))
                set_mask(module, mask, name)
        except Exception as err:
            for module, name, previous, old in reversed(done):
                if old is not None:
                    with torch.no_grad():
                        base_tensor(module, name).copy_(old)
                if previous is None:
                    remove_mask(module, name, bake=False)
                else:
                    set_mask(module, previous, name)
            raise PlanError(f"applying the mask plan failed and was rolled back: {err}") from err
        return model


def score_layers(
    model: nn.Module, fqns: list[str], criterion: str, ctx: PlanContext, seed: int = 0
) -> dict[str, Tensor]:
    """Scores of each layer's effective weight; already-pruned weights score -inf (stay pruned)."""
    info = get_criterion(criterion)
    if info.needs_data and ctx.data is None and not ctx.stats:
        raise ConfigError(f"criterion {criterion!r} needs calibration data: pass data=...")
    generator = ctx.generator or torch.Generator().manual_seed(seed)
    modules = dict(model.named_modules())
    scores = {}
    for fqn in fqns:
        module = modules[fqn]
        check_finite_weight(fqn, module, f"rank it with {criterion!r}")
        with torch.no_grad():
            score = info.fn(module.weight, ScoreContext(fqn, module, generator, ctx.stats.get(fqn, {})))
            mask = get_mask(module)
            if mask is not None:
                score = score.float().masked_fill(~place_like(mask.mask, score), float("-inf"))
        scores[f"{fqn}.weight"] = score
    return scores


# --------------------------------------------------------------------------------------------
# The verbs.


def _merge(plans: list[Any]) -> Any:
    if len(plans) == 1:
        return plans[0]
    if not all(isinstance(p, MaskPlan) for p in plans):
        raise ConfigError("PerLayer can mix mask configs only (unstructured, N:M, block)")
    merged = MaskPlan()
    for p in plans:
        merged = merged.merge(p)
    return merged


def plan(
    model: nn.Module,
    config: FrozenConfig,
    example_inputs: Any = None,
    *,
    data: Iterable[Any] | None = None,
    generator: torch.Generator | None = None,
    progress: bool = False,
    max_memory: int | str | None = None,
) -> Any:
    """Compute what `config` would prune in `model`, without mutating it.

    Args:
        model: the model to prune.
        config: a method config (e.g. `UnstructuredConfig`) or `PerLayer` rules.
        example_inputs: inputs for methods that trace the model (structured pruning).
        data: calibration batches for criteria that need activations.
        generator: RNG for random criteria (a `GradualPruner` passes its own to stay resumable).
        progress: show a progress bar on long planning work.
        max_memory: memory budget of a calibration pass (Wanda, SparseGPT), in bytes or as
            "4GB"/"512MiB"; the pass estimates its peak first and raises `MemoryBudgetError`
            instead of starting when it would not fit (`prunekit.core.memory`).

    Returns:
        A plan with `summary()` and `apply(model)`.
    """
    parse_memory(max_memory)  # a malformed budget fails here, whatever the method
    ctx = PlanContext(example_inputs, data, generator, progress, max_memory=max_memory)
    if isinstance(config, PerLayer):
        groups = group_by_config(resolve(model, config))
        plans: list[Any] = []
        for _, info in METHODS.items():
            if info.plan_many is not None:
                done, groups = info.plan_many(model, groups, ctx)
                plans.extend(done)
        return _merge(plans + [get_method(type(c)).plan_fn(model, c, fqns, ctx) for c, fqns in groups.items()])
    method = get_method(type(config))
    fqns = list(resolve(model, config)) if method.per_layer else None
    return method.plan_fn(model, config, fqns, ctx)


def prune(
    model: nn.Module,
    config: FrozenConfig,
    example_inputs: Any = None,
    *,
    data: Iterable[Any] | None = None,
    progress: bool = False,
    max_memory: int | str | None = None,
) -> nn.Module:
    """Prune `model` in place as `config` says and return it; on error it is left unchanged.

    Example:
        >>> model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
        >>> model = prune(model, UnstructuredConfig(sparsity=0.5))
        >>> round(float(__import__("prunekit").sparsity(model)), 2)
        0.5
    """
    return plan(model, config, example_inputs, data=data, progress=progress, max_memory=max_memory).apply(model)
