"""Where a mixture-of-experts LM keeps its experts, and how its routers use them on calibration data.

`moe_layout` finds the sparse MoE blocks of a transformers 5 model (fused `gate_up_proj` /
`down_proj` experts behind a linear router); `expert_importance` runs one calibration pass with
hooks on every router and experts module and returns, per block, how often and how strongly each
expert is selected and how active each of its FFN neurons is. `ExpertConfig` (`moe.py`) ranks
experts and neurons with these.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from prunekit.core.distributed import all_reduce_sum
from prunekit.errors import CalibrationError, ConfigError, PlanError
from prunekit.methods.batches import rank_batches
from prunekit.structured.llm import Weights, calibration_pass, layer_stack

# model_type -> (config field of the expert count, config field of the expert FFN width).
# Each family's experts are `@use_experts_implementation` with the concatenated [gate; up]
# layout, and its router is a plain linear layer followed by softmax and top-k.
FAMILIES = {
    "mixtral": ("num_local_experts", "intermediate_size"),
    "olmoe": ("num_experts", "intermediate_size"),
    "qwen2_moe": ("num_experts", "moe_intermediate_size"),
    "qwen3_moe": ("num_experts", "moe_intermediate_size"),
}


# --------------------------------------------------------------------------------------------
# Where the MoE blocks are.


@dataclass(frozen=True)
class MoeLayout:
    """The sparse MoE blocks of a supported model and their (uniform) sizes.

    Attributes:
        blocks: FQNs of the MoE blocks ("model.layers.0.mlp"), each with `gate` and `experts`.
        fields: the HF config fields of the expert count and the expert FFN width.
    """

    model_type: str
    blocks: tuple[str, ...]
    fields: tuple[str, str]
    n_layers: int
    hidden_size: int
    num_experts: int
    intermediate_size: int
    top_k: int
    element_size: int  # bytes per weight entry of the experts

    def dims(self) -> dict[str, int]:
        """The sizes a plan step records and checks before it is applied."""
        return {"n_layers": self.n_layers, "moe_blocks": len(self.blocks), "hidden_size": self.hidden_size,
                "num_experts": self.num_experts, "expert_intermediate_size": self.intermediate_size}


def _block_sizes(fqn: str, block: Any) -> tuple[int, int, int] | None:
    """(experts, expert width, hidden) of a sparse MoE block, None for other modules."""
    experts, gate = getattr(block, "experts", None), getattr(block, "gate", None)
    gate_up, down = getattr(experts, "gate_up_proj", None), getattr(experts, "down_proj", None)
    if not (isinstance(gate_up, Tensor) and isinstance(down, Tensor) and isinstance(gate, nn.Module)):
        return None
    w = getattr(gate, "weight", None)
    if getattr(experts, "is_transposed", False) or not getattr(experts, "is_concatenated", True):
        raise ConfigError(f"{fqn}.experts: only the concatenated, non-transposed [gate; up] layout is supported")
    if getattr(experts, "has_bias", False) or getattr(gate, "bias", None) is not None:
        raise ConfigError(f"{fqn}: experts or router with biases are not supported")
    e, i2, h = gate_up.shape
    if not isinstance(w, Tensor) or tuple(w.shape) != (e, h) or tuple(down.shape) != (e, h, i2 // 2) or i2 % 2:
        raise PlanError(f"{fqn}: router {getattr(w, 'shape', None)} / experts {tuple(gate_up.shape)}, "
                        f"{tuple(down.shape)} do not fit the fused (E, 2I, H) / (E, H, I) layout")
    return e, i2 // 2, h


def moe_layout(model: nn.Module, owner: str = "ExpertConfig") -> MoeLayout:
    """Find the sparse MoE blocks of a supported model and read their sizes (pure).

    Raises:
        ConfigError: not a supported MoE family, no MoE layer, or masks still attached.
        PlanError: the MoE blocks differ in size (pruned non-uniformly before).
    """
    config: Any = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in FAMILIES:
        raise ConfigError(
            f"{owner}: {type(model).__name__} (model_type {model_type!r}) has no supported mixture-of-experts "
            f"layers; supported model types: {', '.join(FAMILIES)}. Use WidthConfig / ChannelConfig for dense models"
        )
    _, prefix, layers = layer_stack(model, owner)
    if not isinstance(layers, nn.ModuleList):
        raise ConfigError(f"{owner}: {type(model).__name__} has no {prefix}layers stack")
    sizes = {f"{prefix}layers.{i}.mlp": s for i, layer in enumerate(layers)
             if (s := _block_sizes(f"{prefix}layers.{i}.mlp", getattr(layer, "mlp", None))) is not None}
    if not sizes:
        raise ConfigError(f"{owner}: {type(model).__name__} has no mixture-of-experts layers (mlp.gate + mlp.experts)")
    first = next(iter(sizes))
    other = next((k for k, v in sizes.items() if v != sizes[first]), None)
    if other is not None:
        raise PlanError(f"{owner}: MoE blocks differ in size ({first}: {sizes[first]}, {other}: {sizes[other]} as "
                        "(experts, expert width, hidden)); the HF config cannot describe them")
    e, i, h = sizes[first]
    top_k = int(getattr(model.get_submodule(f"{first}.gate"), "top_k", config.num_experts_per_tok))
    experts: Any = model.get_submodule(f"{first}.experts")
    size = experts.down_proj.element_size()
    return MoeLayout(model_type, tuple(sizes), FAMILIES[model_type], len(layers), h, e, i, top_k, size)


# --------------------------------------------------------------------------------------------
# Importance: one calibration pass with hooks on every router and every experts module.


@dataclass(frozen=True)
class ExpertImportance:
    """Router usage and expert neuron activations, per MoE block, over calibration tokens.

    Attributes:
        frequency: (blocks, E) share of tokens that select each expert (rows sum to top_k).
        probability: (blocks, E) mean router softmax probability of each expert.
        tokens: (blocks, E) weighted count of tokens routed to each expert.
        neurons: (blocks, E, I) mean |act(gate) * up| of each neuron over its expert's tokens.
    """

    frequency: Tensor
    probability: Tensor
    tokens: Tensor
    neurons: Tensor


def _attach(
    model: nn.Module, layout: MoeLayout, sums: dict[str, Tensor], weights: Weights, neurons: bool
) -> list[RemovableHandle]:
    """Hooks summing router usage per block and, if `neurons`, expert activations (a second
    pass through each expert's gate_up_proj, as the experts kernel does not expose them)."""
    flat: dict[int, Tensor] = {}  # block -> this batch's token weights, flattened like the router input

    def on_block(j: int, args: tuple) -> None:
        flat[j] = weights(args[0]).reshape(-1)

    def on_router(j: int, out: Any) -> None:
        logits, index, w = out[0].float(), out[2], flat[j].to(out[0].device)
        sums["probability"][j] += (logits.softmax(-1) * w[:, None]).sum(0).double().cpu()
        hits = torch.zeros_like(logits).scatter_(1, index, 1.0)  # (tokens, E): 1 where selected
        sums["frequency"][j] += (hits * w[:, None]).sum(0).double().cpu()

    def on_experts(j: int, experts: Any, args: tuple, kwargs: dict) -> None:
        hidden = args[0] if args else kwargs["hidden_states"]
        index = args[1] if len(args) > 1 else kwargs["top_k_index"]
        w = flat[j].to(hidden.device)
        for e in range(layout.num_experts):
            rows = (index == e).any(-1).nonzero().squeeze(-1)
            if rows.numel():
                gate, up = (hidden[rows].float() @ experts.gate_up_proj[e].float().T).chunk(2, dim=-1)
                act = (experts.act_fn(gate) * up).abs() * w[rows, None]
                sums["neurons"][j, e] += act.sum(0).double().cpu()
                sums["tokens"][j, e] += float(w[rows].sum())

    handles = []
    for j, fqn in enumerate(layout.blocks):
        block = model.get_submodule(fqn)
        handles.append(block.register_forward_pre_hook(lambda _m, a, j=j: on_block(j, a)))
        handles.append(block.get_submodule("gate").register_forward_hook(lambda _m, _a, o, j=j: on_router(j, o)))
        if neurons:
            handles.append(block.get_submodule("experts").register_forward_pre_hook(
                lambda m, a, k, j=j: on_experts(j, m, a, k), with_kwargs=True))
    return handles


def routing_importance(
    model: nn.Module, layout: MoeLayout, batches: list[Any], show: bool, neurons: bool = True
) -> ExpertImportance:
    """`expert_importance` on this rank's `batches` for a known layout; `neurons=False` skips the
    expert activations (a second pass through each experts module), leaving them zero."""
    n, e, i = len(layout.blocks), layout.num_experts, layout.intermediate_size
    sums = {k: torch.zeros(n, e, dtype=torch.float64) for k in ("frequency", "probability", "tokens")}
    sums["neurons"] = torch.zeros(n, e, i, dtype=torch.float64)
    with torch.no_grad():
        attach = lambda w: _attach(model, layout, sums, w, neurons)  # noqa: E731
        total = calibration_pass(model, batches, attach, "expert importance", show)
    sums = {k: all_reduce_sum(v) for k, v in sums.items()}
    for name, t in sums.items():
        if not torch.isfinite(t).all() or total <= 0:
            raise CalibrationError(f"expert importance: router {name} are NaN/Inf, or no tokens were seen")
    mean = sums["neurons"] / sums["tokens"].clamp(min=1e-12)[..., None]  # over each expert's own tokens
    return ExpertImportance(
        (sums["frequency"] / total).float(), (sums["probability"] / total).float(), sums["tokens"].float(), mean.float()
    )


def expert_importance(model: nn.Module, data: Any, *, show_progress: bool = False) -> ExpertImportance:
    """Router usage of every expert and activation of every expert neuron (pure).

    Args:
        model: a Mixtral / OLMoE / Qwen2-MoE / Qwen3-MoE model from transformers.
        data: calibration batches (dicts of `input_ids`, optional `attention_mask`: padded
            tokens are not counted).
    """
    layout = moe_layout(model, "expert_importance")
    return routing_importance(model, layout, rank_batches(data), show_progress)


# --------------------------------------------------------------------------------------------
# Selection.
