"""State-space width: remove inner (d_inner) channels of every Mamba block.

A Mamba block (Gu and Dao 2023, "Mamba: Linear-Time Sequence Modeling with Selective State
Spaces") widens the hidden state to d_inner channels (`in_proj` gives x and the gate z), runs a
depthwise causal `conv1d` and a selective scan per channel, and narrows back with `out_proj`.
A channel c touches only its own rows: x and z rows of `in_proj`, the `conv1d` filter and bias,
`x_proj`'s input column (its only link to the other channels, through dt, B and C), `dt_proj`'s
output row and bias, `A_log`'s row, `D`, and `out_proj`'s input column. Removing all of them
equals the dense model with that channel's conv filter, conv bias and out_proj column zeroed:
the conv then outputs silu(0) = 0, so x_proj (and through it every other channel) never sees
it, and its scan output never reaches the residual stream.

Channels are ranked as Minitron ranks FFN neurons (Muralidharan et al. 2024, "Compact
Language Models via Pruning and Knowledge Distillation"; Taghibakhshi et al. 2025 apply it to
Mamba layers): by the mean |y * silu(z)| each channel feeds `out_proj` on calibration data;
without data, by the L1 norm of its `out_proj` input column. The same count goes from every
block (each block choosing its own channels), so `config.intermediate_size` still describes the
model and `save_pretrained` / `from_pretrained` rebuild it (MambaConfig reads a saved
`intermediate_size` back after deriving it from `expand * hidden_size`).

Mamba2 (fused z/x/B/C/dt projection, heads, a gated RMSNorm over groups of channels) is refused.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, NonNegativeInt
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from prunekit.config import FrozenConfig, config_from_dict, config_to_dict, recipe_type
from prunekit.core.distributed import all_reduce_sum
from prunekit.core.plan import PlanContext, register_method
from prunekit.errors import CalibrationError, ConfigError, PlanError
from prunekit.methods.batches import rank_batches
from prunekit.storage.files import validate_document
from prunekit.structured.llm import (
    STEPS,
    LLMPlan,
    Slices,
    Weights,
    calibration_pass,
    removed_params,
    sliced_parameters,
)

log = logging.getLogger(__name__)

# Mamba v1 mixers; Falcon-Mamba only adds weightless norms over dt_rank and d_state, not d_inner.
SUPPORTED_SSM_TYPES = ("mamba", "falcon_mamba")


@recipe_type
class StateSpaceConfig(FrozenConfig):
    """Remove inner (d_inner) channels from every block of a Mamba language model.

    Args:
        ratio: fraction of each block's d_inner channels removed, in [0, 1); the same count
            in every block, each block choosing its own channels.
        criterion: "activation" (Minitron: mean |y * silu(z)| entering out_proj on the
            calibration data), "l1" (L1 norm of out_proj's input columns, no data needed), or
            "auto" (activation when `data=` is given, else l1).
        round_to: the kept width is rounded up to a multiple of this (8 or 64 keep matmuls fast).

    Example:
        >>> StateSpaceConfig(ratio=0.3).criterion
        'auto'
    """

    ratio: float = Field(ge=0.0, lt=1.0)
    criterion: Literal["auto", "activation", "l1"] = "auto"
    round_to: int = Field(default=1, ge=1)

    def with_level(self, level: float) -> StateSpaceConfig:
        """A copy removing `level` of the channels: a state-space config's level is its ratio."""
        return self.model_copy(update={"ratio": level})


# --------------------------------------------------------------------------------------------
# The Mamba stack of a supported model.


@dataclass(frozen=True)
class MambaLayout:
    """Where the blocks of a Mamba model live, and their (uniform) widths, read from the modules.

    Attributes:
        prefix: "backbone." for a `MambaForCausalLM`, "" for a bare `MambaModel`.
        head: FQN of the output head ("lm_head"), or None for a bare model.
    """

    prefix: str
    head: str | None
    n_layers: int
    hidden_size: int
    intermediate_size: int
    state_size: int
    time_step_rank: int
    conv_kernel: int

    def mixer(self, i: int) -> str:
        """FQN of block `i`'s mixer."""
        return f"{self.prefix}layers.{i}.mixer"

    @property
    def embed(self) -> str:
        return f"{self.prefix}embeddings"

    def dims(self) -> dict[str, int]:
        """The widths a plan step records and checks before it is applied."""
        return {
            "n_layers": self.n_layers,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "state_size": self.state_size,
            "time_step_rank": self.time_step_rank,
            "conv_kernel": self.conv_kernel,
        }


def _mixer_widths(fqn: str, mixer: nn.Module) -> tuple[int, int, int, int, int]:
    """(hidden, d_inner, d_state, dt_rank, kernel) of one mixer; `PlanError` if its parts disagree."""
    parts = {"in_proj": nn.Linear, "conv1d": nn.Conv1d, "x_proj": nn.Linear, "dt_proj": nn.Linear}
    for name, kind in (parts | {"out_proj": nn.Linear}).items():
        if not isinstance(getattr(mixer, name, None), kind):
            raise ConfigError(f"Mamba mixer {fqn!r} has no {kind.__name__} {name!r}: not a Mamba v1 mixer")
    for name in ("A_log", "D"):
        if not isinstance(getattr(mixer, name, None), Tensor):
            raise ConfigError(f"Mamba mixer {fqn!r} has no parameter {name!r}: not a Mamba v1 mixer")
    m: Any = mixer
    d, hidden = m.out_proj.in_features, m.out_proj.out_features
    n, r, kernel = m.A_log.shape[-1], m.dt_proj.in_features, m.conv1d.weight.shape[-1]
    found = {
        "in_proj rows": m.in_proj.out_features,
        "conv1d channels": m.conv1d.weight.shape[0],
        "conv1d groups": m.conv1d.groups,
        "x_proj columns": m.x_proj.in_features,
        "dt_proj rows": m.dt_proj.out_features,
        "A_log rows": m.A_log.shape[0],
        "D": m.D.shape[0],
    }
    expected = {k: 2 * d if k == "in_proj rows" else d for k in found}
    wrong = {k: v for k, v in found.items() if v != expected[k]}
    if wrong or m.x_proj.out_features != r + 2 * n or m.in_proj.in_features != hidden:
        raise PlanError(
            f"Mamba mixer {fqn!r}: widths disagree with out_proj's {d} inner channels "
            f"({wrong or 'x_proj/in_proj shapes'}); was it pruned by hand?"
        )
    return hidden, d, n, r, kernel


def mamba_layout(model: nn.Module, owner: str) -> MambaLayout:
    """Find the blocks of a Mamba model and read their widths (pure).

    Raises:
        ConfigError: not a Mamba (v1) model (Mamba2 is refused with the reason), masks still
            attached, or a block lacks a part.
        PlanError: blocks differ in width, so neither the HF config nor a uniform plan fits.
    """
    config: Any = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    name = type(model).__name__
    if model_type in ("mamba2", "nemotron_h", "bamba", "zamba2", "falcon_h1"):
        raise ConfigError(
            f"{owner}: {name} (model_type {model_type!r}) is not supported yet: Mamba2's fused in_proj "
            "packs z, x, B, C and dt per head and its gated RMSNorm normalises over groups of d_inner "
            "channels, so removing heads would change the norm of the heads kept (no exact equivalence); "
            f"{owner} prunes Mamba v1 models (model_type {', '.join(SUPPORTED_SSM_TYPES)})"
        )
    if model_type not in SUPPORTED_SSM_TYPES:
        raise ConfigError(
            f"{owner}: supports Mamba models (model_type {', '.join(SUPPORTED_SSM_TYPES)}); {name} has "
            f"model_type {model_type!r}. Use WidthConfig for Llama-family models, ChannelConfig for others"
        )
    if any(hasattr(m, "parametrizations") for m in model.modules()):
        raise ConfigError(f"{owner}: the model has masks attached; call prunekit.finalize(model) first")
    inner = getattr(model, "backbone", None)
    base, prefix = (inner, "backbone.") if isinstance(inner, nn.Module) else (model, "")
    layers = getattr(base, "layers", None)
    embed = getattr(base, "embeddings", None)
    if not isinstance(layers, nn.ModuleList) or not len(layers) or not isinstance(embed, nn.Embedding):
        raise ConfigError(f"{owner}: {name} has no {prefix}layers / {prefix}embeddings stack")
    widths = {i: _mixer_widths(f"{prefix}layers.{i}.mixer", b.get_submodule("mixer")) for i, b in enumerate(layers)}
    if len(set(widths.values())) > 1:
        other = next(i for i, w in widths.items() if w != widths[0])
        raise PlanError(
            f"{owner}: Mamba blocks differ in width ({prefix}layers.0: {widths[0]}, {prefix}layers.{other}: "
            f"{widths[other]} as (hidden, d_inner, d_state, dt_rank, kernel)); the HF config cannot describe them"
        )
    head = "lm_head" if isinstance(getattr(model, "lm_head", None), nn.Linear) else None
    return MambaLayout(prefix, head, len(layers), *widths[0])


# --------------------------------------------------------------------------------------------
# Scores and selection.


def _activation_scores(model: nn.Module, layout: MambaLayout, batches: list[Any], show: bool) -> Tensor:
    sums = torch.zeros(layout.n_layers, layout.intermediate_size, dtype=torch.float64)

    def attach(weights: Weights) -> list[RemovableHandle]:
        def add(i: int, y: Tensor) -> None:  # y: (B, T, d_inner), the gated scan output
            sums[i] += (y.float().abs() * weights(y).unsqueeze(-1)).sum(dim=(0, 1)).double().cpu()

        return [
            model.get_submodule(f"{layout.mixer(i)}.out_proj").register_forward_pre_hook(
                lambda _m, a, i=i: add(i, a[0])
            )
            for i in range(layout.n_layers)
        ]

    total = calibration_pass(model, batches, attach, "state-space importance", show)
    sums = all_reduce_sum(sums)
    if total <= 0 or not torch.isfinite(sums).all():
        raise CalibrationError("state-space importance: out_proj inputs are NaN/Inf, or no tokens were seen")
    return (sums / total).float()


def ssm_channel_importance(model: nn.Module, data: Any = None, *, show_progress: bool = False) -> Tensor:
    """Importance of every inner channel of every Mamba block, (n_layers, d_inner) (pure).

    Args:
        model: a `MambaForCausalLM` (or bare `MambaModel`).
        data: calibration batches (dicts of `input_ids`, optional `attention_mask`): mean
            |y * silu(z)| entering out_proj (Minitron). None: L1 norm of out_proj's columns.
    """
    layout = mamba_layout(model, "ssm_channel_importance")
    if data is not None:
        return _activation_scores(model, layout, rank_batches(data), show_progress)
    with torch.no_grad():
        outs = [model.get_parameter(f"{layout.mixer(i)}.out_proj.weight") for i in range(layout.n_layers)]
        cols = [w.float().abs().sum(dim=0) for w in outs]
    return torch.stack(cols).cpu()


def _kept_count(config: StateSpaceConfig, n: int, where: str) -> int:
    kept = n - math.floor(config.ratio * n + 0.5)
    kept = min(n, -(-kept // config.round_to) * config.round_to) if kept else 0
    if kept == 0:
        raise ConfigError(
            f"StateSpaceConfig.ratio: {config.ratio} would remove all {n} inner channels of {where}; "
            "use a smaller ratio"
        )
    return kept


def _top(scores: Tensor, k: int) -> list[int]:
    """Indices of the `k` highest scores, ascending (ties broken by index: deterministic)."""
    order = sorted(range(len(scores)), key=lambda i: (-float(scores[i]), i))
    return sorted(order[:k])


# --------------------------------------------------------------------------------------------
# The plan step.


# Mixer tensors whose dim 0 is one row per inner channel.
_PER_CHANNEL = ("conv1d.weight", "conv1d.bias", "dt_proj.weight", "dt_proj.bias", "A_log", "D")


class _SSMDoc(BaseModel):
    model_config = ConfigDict(extra="forbid")
    config: dict[str, Any]
    dense: dict[str, int]
    scored_by: Literal["activation", "l1"]
    keep: list[list[NonNegativeInt]]


@dataclass
class StateSpaceStep:
    """Per Mamba block, the inner channels kept (ascending, the same count in every block); pure data.

    Attributes:
        config: the config it was planned from.
        dense: the widths it was planned for (`MambaLayout.dims`), checked before applying.
        scored_by: "activation" or "l1", what the channels were ranked by.
        keep: one list of kept d_inner channels per block.
    """

    kind: ClassVar[str] = "ssm_channels"
    config: StateSpaceConfig
    dense: dict[str, int]
    scored_by: Literal["activation", "l1"]
    keep: list[list[int]]

    def describe(self) -> list[str]:
        """Widths before -> after, and how many channels go from each block."""
        d, k = self.dense["intermediate_size"], len(self.keep[0])
        return [
            f"ssm channels ({self.scored_by}): intermediate_size {d} -> {k} in each of "
            f"{self.dense['n_layers']} Mamba blocks ({d - k} channels removed per block)"
        ]

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able data (the plan adds the kind)."""
        config = config_to_dict(self.config)
        return {"config": config, "dense": self.dense, "scored_by": self.scored_by, "keep": self.keep}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> StateSpaceStep:
        """Rebuild a step from `to_dict` output; `PlanError` on anything malformed."""
        doc = validate_document(data, _SSMDoc, "LLM plan ssm_channels step", PlanError)
        config = config_from_dict(doc.config, "ssm_channels step.config")
        if not isinstance(config, StateSpaceConfig):
            raise PlanError(f"ssm_channels step.config is a {type(config).__name__}, not a StateSpaceConfig")
        step = cls(config, dict(doc.dense), doc.scored_by, [list(k) for k in doc.keep])
        step.check()
        return step

    def check(self) -> None:
        """`PlanError` unless there is one equally long, valid index list per block."""
        n, d = self.dense.get("n_layers"), self.dense.get("intermediate_size", 0)
        if len(self.keep) != n or len({len(k) for k in self.keep}) != 1:
            raise PlanError(f"ssm_channels step: keep needs one equally long list per block ({n})")
        for i, kept in enumerate(self.keep):
            if not kept or kept != sorted(set(kept)) or kept[-1] >= d:
                raise PlanError(f"ssm_channels step: keep[{i}] must be ascending, distinct, non-empty and below {d}")

    def model_dims(self, model: nn.Module) -> dict[str, int]:
        """`model`'s widths in the form of `dense` (what a replay compares before applying)."""
        return mamba_layout(model, "StateSpaceConfig").dims()

    def slices(self, layout: MambaLayout) -> Slices:
        """Tensor FQN -> dim -> kept indices, for every tensor this step shrinks (biases included)."""
        d, out = self.dense["intermediate_size"], Slices()
        for i, kept in enumerate(self.keep):
            m = layout.mixer(i)
            xz = kept + [d + c for c in kept]  # in_proj's output is [x; z], split in half by the mixer
            rows = {f"{m}.in_proj.weight": xz, f"{m}.in_proj.bias": xz}
            rows |= {f"{m}.{t}": kept for t in _PER_CHANNEL}
            out |= {k: {0: v} for k, v in rows.items()}
            out |= {f"{m}.x_proj.weight": {1: kept}, f"{m}.out_proj.weight": {1: kept}}
        return out

    def apply_to(self, model: nn.Module) -> None:
        """Shrink every mixer's tensors, its shape attributes and the HF config (mutates)."""
        layout = mamba_layout(model, "StateSpaceConfig")
        wrong = {k: v for k, v in self.dense.items() if layout.dims().get(k) != v}
        if wrong:
            raise PlanError(
                f"this ssm_channels step was planned for {wrong} (model has "
                f"{ {k: layout.dims().get(k) for k in wrong} }): already pruned, or another model?"
            )
        self.check()
        new = sliced_parameters(model, self.slices(layout))
        for module in model.modules():
            for name, p in list(module._parameters.items()):
                if p is not None and id(p) in new:
                    module._parameters[name] = new[id(p)]
        for i, kept in enumerate(self.keep):
            _update_mixer(model.get_submodule(layout.mixer(i)), kept, self.dense["intermediate_size"])
        config: Any = getattr(model, "config", None)
        if config is not None:  # read back by from_pretrained after it derives expand * hidden_size
            config.intermediate_size = len(self.keep[0])


STEPS.register(StateSpaceStep.kind, StateSpaceStep.from_dict)


def _update_mixer(mixer: Any, kept: list[int], dense: int) -> None:
    """Refresh the shape attributes a mixer and its layers keep (mutates)."""
    k = len(kept)
    for linear in (mixer.in_proj, mixer.x_proj, mixer.dt_proj, mixer.out_proj):
        linear.out_features, linear.in_features = linear.weight.shape
    mixer.conv1d.in_channels = mixer.conv1d.out_channels = mixer.conv1d.groups = k
    mixer.intermediate_size = k
    norm: Any = getattr(mixer, "dt_layernorm", None)  # Falcon-Mamba: an unused, non-persistent buffer of d_inner ones
    weight = getattr(norm, "weight", None)
    if isinstance(weight, Tensor) and weight.shape == (dense,):
        norm._buffers["weight"] = weight[kept].clone()


def _param_counts(model: nn.Module, layout: MambaLayout) -> tuple[int, int]:
    """(all parameters, embedding parameters), each shared tensor once (the tied head counts once)."""
    params = {id(p): p.numel() for p in model.parameters()}
    ids = {id(model.get_submodule(layout.embed).weight)}
    if layout.head is not None:
        ids.add(id(model.get_submodule(layout.head).weight))
    return sum(params.values()), sum(params.get(i, 0) for i in ids)


@register_method(StateSpaceConfig, per_layer=False)
def plan_ssm_channels(model: nn.Module, config: StateSpaceConfig, fqns: list[str] | None, ctx: PlanContext) -> LLMPlan:
    """Rank every Mamba block's inner channels and choose the ones to remove (pure).

    Raises:
        ConfigError: not a Mamba (v1) model (Mamba2 and other families are named and refused),
            or a ratio that would remove every channel of a block.
        CalibrationError: criterion "activation" without data, malformed data, or NaN/Inf.
    """
    layout = mamba_layout(model, "StateSpaceConfig")
    kept = _kept_count(config, layout.intermediate_size, f"every Mamba block (e.g. {layout.mixer(0)})")
    scored_by: Literal["activation", "l1"] = (
        "l1" if config.criterion == "l1" or (config.criterion == "auto" and ctx.data is None) else "activation"
    )
    if scored_by == "activation":
        scores = _activation_scores(model, layout, rank_batches(ctx.data), ctx.progress)
    else:
        scores = ssm_channel_importance(model)
    step = StateSpaceStep(config, layout.dims(), scored_by, [_top(s, kept) for s in scores])
    step.check()
    before, embed = _param_counts(model, layout)
    stats = {
        "params_before": before,
        "params_after": before - removed_params(model, step.slices(layout)),
        "embedding_params_before": embed,
        "embedding_params_after": embed,
    }
    plan = LLMPlan([step], stats)
    log.info("%s", plan.summary())
    return plan
