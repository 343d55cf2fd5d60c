"""Depth compression: remove whole decoder blocks of a Llama-family LM.

Block influence (Men et al. 2024, "ShortGPT: Layers in Large Language Models are More
Redundant Than You Expect"): BI_i = 1 - E_tokens[cos(h_i, h_i+1)], with h_i the hidden state
entering block i and h_i+1 the one leaving it, on calibration data. A block that hardly turns
the residual stream is redundant; `criterion="block_influence"` removes the n blocks of lowest
BI, wherever they are. `criterion="angular"` (Gromov et al. 2024, "The Unreasonable
Ineffectiveness of the Deeper Layers") removes n *contiguous* blocks l..l+n-1, the run whose
input and output are closest in angular distance arccos(cos(h_l, h_l+n)) / pi.

Removing a block keeps the model a plain `*ForCausalLM`: the kept blocks are renumbered
(`layer_idx`, which the KV cache is keyed by), and `config.num_hidden_layers` (and
`layer_types` where the family has it) follow, so `save_pretrained`/`from_pretrained` rebuild it.
"""

from __future__ import annotations

import logging
import math
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, NonNegativeInt, model_validator
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from prunekit.config import FrozenConfig, config_from_dict, config_to_dict, recipe_type
from prunekit.core.distributed import all_reduce_sum
from prunekit.core.plan import PlanContext, register_method
from prunekit.errors import CalibrationError, ConfigError, PlanError
from prunekit.methods.batches import Batch, rank_batches
from prunekit.storage.files import validate_document
from prunekit.structured.llm import (
    STEPS,
    DecoderLayout,
    LLMPlan,
    Weights,
    calibration_pass,
    check_dims,
    decoder_layout,
    param_counts,
)

log = logging.getLogger(__name__)


@recipe_type
class DepthConfig(FrozenConfig):
    """Remove whole decoder blocks of a Llama-family language model.

    Args:
        n_blocks: how many blocks to remove; or
        ratio: the fraction of blocks to remove, in [0, 1) (rounded to the nearest count).
        criterion: "block_influence" (ShortGPT: the n blocks of lowest BI) or "angular"
            (Gromov et al.: the n contiguous blocks whose input and output are closest).
        keep_blocks: block indices never removed (e.g. the first and last blocks).

    Example:
        >>> DepthConfig(n_blocks=4).criterion
        'block_influence'
    """

    n_blocks: int | None = Field(default=None, ge=0)
    ratio: float | None = Field(default=None, ge=0.0, lt=1.0)
    criterion: Literal["block_influence", "angular"] = "block_influence"
    keep_blocks: tuple[NonNegativeInt, ...] = ()

    @model_validator(mode="after")
    def _one_amount(self) -> DepthConfig:
        if (self.n_blocks is None) == (self.ratio is None):
            raise ValueError("give exactly one of n_blocks (a count) or ratio (a fraction of the blocks)")
        return self

    def with_level(self, level: float) -> DepthConfig:
        """A copy removing `level` of the blocks: a depth config's level is its ratio."""
        return self.model_copy(update={"ratio": level, "n_blocks": None})

    def count(self, n_layers: int, where: str = "layers") -> int:
        """Blocks to remove from a stack of `n_layers`; `ConfigError` if that leaves none."""
        n = self.n_blocks if self.n_blocks is not None else math.floor(self.ratio * n_layers + 0.5)  # type: ignore[operator]
        field = "n_blocks" if self.n_blocks is not None else "ratio"
        value = self.n_blocks if self.n_blocks is not None else self.ratio
        if n >= n_layers:
            raise ConfigError(
                f"DepthConfig.{field}: {value} would remove all {n_layers} decoder blocks of "
                f"{where!r}; remove at most {n_layers - 1}"
            )
        bad = [k for k in self.keep_blocks if k >= n_layers]
        if bad:
            raise ConfigError(f"DepthConfig.keep_blocks: {bad[0]} is not a block of {where!r} (0..{n_layers - 1})")
        free = n_layers - len(set(self.keep_blocks))
        if n > free:
            raise ConfigError(
                f"DepthConfig.{field}: {value} asks for {n} blocks but keep_blocks leaves only "
                f"{free} of {where!r} removable"
            )
        return n


# --------------------------------------------------------------------------------------------
# Scores: one calibration pass with a hook on every block.


def _hidden_in(args: tuple, kwargs: dict) -> Tensor:
    return args[0] if args else kwargs["hidden_states"]


def _hidden_out(out: Any) -> Tensor:
    return out[0] if isinstance(out, (tuple, list)) else out


def _cosine(a: Tensor, b: Tensor) -> Tensor:
    return F.cosine_similarity(a.float(), b.float(), dim=-1)


def _angle(a: Tensor, b: Tensor) -> Tensor:
    return torch.arccos(_cosine(a, b).clamp(-1.0, 1.0)) / math.pi


Measure = Callable[[Tensor, Tensor], Tensor]


def _block_pass(
    model: nn.Module, layout: DecoderLayout, batches: list[Batch], span: int, measure: Measure, show: bool
) -> Tensor:
    """Token-weighted mean over calibration tokens of measure(h_l, h_l+span), for every start l.

    A window of the last `span` block inputs is kept, so memory stays at `span` hidden states.
    """
    sums = torch.zeros(layout.n_layers - span + 1, dtype=torch.float64)
    window: deque[Tensor] = deque(maxlen=span)

    def attach(weights: Weights) -> list[RemovableHandle]:
        def hook(index: int, args: tuple, kwargs: dict, out: Any) -> None:
            window.append(_hidden_in(args, kwargs))
            if index + 1 - span >= 0:
                h_out = _hidden_out(out)
                sums[index + 1 - span] += float((measure(window[0], h_out) * weights(h_out)).sum())

        layers = layout.blocks(model)
        return [
            layer.register_forward_hook(lambda _m, a, k, o, i=i: hook(i, a, k, o), with_kwargs=True)
            for i, layer in enumerate(layers)
        ]

    total = calibration_pass(model, batches, attach, "block influence", show, reset=window.clear)
    sums = all_reduce_sum(sums)
    if total <= 0 or not torch.isfinite(sums).all():
        bad = int((~torch.isfinite(sums)).nonzero()[0]) if not torch.isfinite(sums).all() else 0
        raise CalibrationError(f"block {layout.layer(bad)!r}: hidden states are NaN/Inf, or no tokens were seen")
    return (sums / total).float()


def block_influence(model: nn.Module, data: Any, *, show_progress: bool = False) -> Tensor:
    """ShortGPT's block influence of every decoder block, 1 - mean cos(h_in, h_out) (pure).

    Args:
        model: a Llama-family model.
        data: calibration batches (dicts of `input_ids`, optional `attention_mask`: padded
            tokens are not counted).

    Returns:
        A float tensor with one score per block; low = the block changes little.
    """
    layout = decoder_layout(model, "block_influence")
    return 1.0 - _block_pass(model, layout, rank_batches(data), 1, _cosine, show_progress)


def angular_distances(model: nn.Module, data: Any, n_blocks: int, *, show_progress: bool = False) -> Tensor:
    """Gromov et al.'s distance arccos(cos(h_l, h_l+n)) / pi for every run of `n_blocks` (pure).

    Returns:
        One distance per start block l (n_layers - n_blocks + 1 of them), averaged over tokens
        (the mean of the per-token angles, as in the paper).
    """
    layout = decoder_layout(model, "angular_distances")
    if not 1 <= n_blocks <= layout.n_layers:
        raise ConfigError(f"angular_distances: n_blocks {n_blocks} outside 1..{layout.n_layers}")
    # The mean angle is not the angle of the mean cosine: accumulate angles, not cosines.
    return _block_pass(model, layout, rank_batches(data), n_blocks, _angle, show_progress)


# --------------------------------------------------------------------------------------------
# The plan step.


class _DepthDoc(BaseModel):
    model_config = ConfigDict(extra="forbid")
    config: dict[str, Any]
    dense: dict[str, int]
    keep: list[NonNegativeInt]
    scores: list[float] = []


@dataclass
class DepthStep:
    """Keep blocks `keep` (in order) of a stack of `dense["n_layers"]`; pure data.

    Attributes:
        config: the config it was planned from.
        dense: the widths it was planned for (`DecoderLayout.dims`), checked before applying.
        keep: kept block indices, ascending.
        scores: per block (block influence) or per start block (angular distance), for reading.
    """

    kind: ClassVar[str] = "depth"
    config: DepthConfig
    dense: dict[str, int]
    keep: list[int]
    scores: list[float]

    @property
    def removed(self) -> list[int]:
        """Indices of the removed blocks, ascending."""
        return [i for i in range(self.dense["n_layers"]) if i not in set(self.keep)]

    def describe(self) -> list[str]:
        """Which blocks go, and the scores they were chosen by."""
        name = "block influence" if self.config.criterion == "block_influence" else "angular distance from block"
        scores = " ".join(f"{i}:{s:.3f}" for i, s in enumerate(self.scores))
        return [
            f"depth ({self.config.criterion}): remove {len(self.removed)} of {self.dense['n_layers']} "
            f"decoder blocks {self.removed}",
            f"  {name}: {scores}",
        ]

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able data (the plan adds the kind)."""
        return {"config": config_to_dict(self.config), "dense": self.dense, "keep": self.keep, "scores": self.scores}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DepthStep:
        """Rebuild a step from `to_dict` output; `PlanError` on anything malformed."""
        doc = validate_document(data, _DepthDoc, "LLM plan depth step", PlanError)
        config = config_from_dict(doc.config, "depth step.config")
        if not isinstance(config, DepthConfig):
            raise PlanError(f"depth step.config is a {type(config).__name__}, not a DepthConfig")
        n = doc.dense.get("n_layers", 0)
        if not doc.keep or doc.keep != sorted(set(doc.keep)) or doc.keep[-1] >= n:
            raise PlanError(f"depth step: keep {doc.keep} must be ascending, distinct, non-empty and below {n}")
        return cls(config, dict(doc.dense), list(doc.keep), list(doc.scores))

    def apply_to(self, model: nn.Module) -> None:
        """Remove the blocks from `model` (mutates); the model's widths are checked first."""
        layout = decoder_layout(model, "DepthConfig")
        check_dims(layout, self.dense, "this depth step")
        layers = layout.blocks(model)
        kept = nn.ModuleList([layers[i] for i in self.keep])
        for j, layer in enumerate(kept):
            for module in layer.modules():  # the KV cache is indexed by layer_idx
                if isinstance(getattr(module, "layer_idx", None), int):
                    setattr(module, "layer_idx", j)  # noqa: B010 (nn.Module's __setattr__ is typed for tensors)
        parent = model.get_submodule(layout.prefix.rstrip(".")) if layout.prefix else model
        parent.layers = kept
        config: Any = getattr(model, "config", None)
        if config is not None:
            config.num_hidden_layers = len(self.keep)
            types = getattr(config, "layer_types", None)
            if isinstance(types, list) and len(types) == self.dense["n_layers"]:
                config.layer_types = [types[i] for i in self.keep]


STEPS.register("depth", DepthStep.from_dict)


def _choose(config: DepthConfig, scores: Tensor, n: int, n_layers: int) -> list[int]:
    """The blocks to remove: the n lowest scores, or the best contiguous run of n."""
    keep = set(config.keep_blocks)
    if n == 0:
        return []
    if config.criterion == "block_influence":
        order = sorted((i for i in range(n_layers) if i not in keep), key=lambda i: (float(scores[i]), i))
        return sorted(order[:n])
    starts = [s for s in range(n_layers - n + 1) if not keep & set(range(s, s + n))]
    if not starts:
        raise ConfigError(f"DepthConfig.keep_blocks: {sorted(keep)} leaves no run of {n} contiguous blocks to remove")
    best = min(starts, key=lambda s: (float(scores[s]), s))
    return list(range(best, best + n))


@register_method(DepthConfig, per_layer=False)
def plan_depth(model: nn.Module, config: DepthConfig, fqns: list[str] | None, ctx: PlanContext) -> LLMPlan:
    """Score every decoder block on `ctx.data` and choose the blocks to remove (pure).

    Raises:
        ConfigError: not a Llama-family model, or the count removes every (removable) block.
        CalibrationError: no or malformed calibration data, or NaN/Inf hidden states.
    """
    layout = decoder_layout(model, "DepthConfig")
    n = config.count(layout.n_layers, layout.layers)
    batches = rank_batches(ctx.data)
    if config.criterion == "block_influence":
        scores = 1.0 - _block_pass(model, layout, batches, 1, _cosine, ctx.progress)
    else:
        scores = _block_pass(model, layout, batches, max(n, 1), _angle, ctx.progress)
    removed = _choose(config, scores, n, layout.n_layers)
    keep = [i for i in range(layout.n_layers) if i not in removed]
    step = DepthStep(config, layout.dims(), keep, [round(float(s), 6) for s in scores])
    before, embed = param_counts(model, layout)
    layers = layout.blocks(model)
    gone = {id(p): p.numel() for i in removed for p in layers[i].parameters()}
    stats = {
        "params_before": before,
        "params_after": before - sum(gone.values()),
        "embedding_params_before": embed,
        "embedding_params_after": embed,
    }
    plan = LLMPlan([step], stats)
    log.info("%s", plan.summary())
    return plan
