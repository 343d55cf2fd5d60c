"""Width compression: remove attention heads, FFN neurons and hidden channels of a Llama-family LM.

Minitron (Muralidharan et al. 2024, "Compact Language Models via Pruning and Knowledge
Distillation") ranks each unit by the activations it produces on a little calibration data
(no gradients), aggregated over batch and sequence:

- an attention head by the L2 norm of its output (the input of `o_proj`, per head);
- an FFN neuron by its mean |activation| entering `down_proj` (act(gate) * up);
- a hidden (embedding) channel by its mean |output| of every RMSNorm (both norms of every
  block and the final norm), summed: the residual stream as each sublayer reads it.

Widths stay uniform over blocks (the same number of heads/neurons removed from every block,
each block choosing its own), so the HF config still describes the model. With grouped-query
attention a head is removed with care for its KV group: `head_unit="query"` removes the same
number of query heads from every group (KV heads stay), `head_unit="kv_group"` removes whole
groups (a K/V head and its query heads), so `num_attention_heads` stays a multiple of
`num_key_value_heads`. Hidden channels are removed from the whole residual stream at once:
embedding columns, every norm, every q/k/v/gate/up input column, every o/down output row and
the output head's columns (one tensor when the head is tied to the embedding).
"""

from __future__ import annotations

import copy
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
    DecoderLayout,
    LLMPlan,
    Slices,
    Weights,
    calibration_pass,
    check_dims,
    decoder_layout,
    embedding_ids,
    param_counts,
    removed_params,
    sliced_parameters,
)

log = logging.getLogger(__name__)


@recipe_type
class WidthConfig(FrozenConfig):
    """Remove attention heads, FFN neurons and hidden channels of a Llama-family LM (Minitron).

    Args:
        heads_ratio: fraction of query heads removed from every block, in [0, 1).
        head_unit: "query" removes query heads evenly from every KV group (KV heads stay);
            "kv_group" removes whole KV groups with their query heads. With one query head
            per group (plain multi-head attention) the two are the same.
        ffn_ratio: fraction of FFN neurons (intermediate_size) removed from every block.
        hidden_ratio: fraction of hidden channels (hidden_size, the residual stream and the
            embedding width) removed.
        round_to: kept FFN and hidden widths are rounded up to a multiple of this (64 keeps
            matmuls efficient).

    Example:
        >>> WidthConfig(ffn_ratio=0.3, hidden_ratio=0.1, round_to=64).head_unit
        'query'
    """

    heads_ratio: float = Field(default=0.0, ge=0.0, lt=1.0)
    head_unit: Literal["query", "kv_group"] = "query"
    ffn_ratio: float = Field(default=0.0, ge=0.0, lt=1.0)
    hidden_ratio: float = Field(default=0.0, ge=0.0, lt=1.0)
    round_to: int = Field(default=1, ge=1)


# --------------------------------------------------------------------------------------------
# Importance: one calibration pass with hooks on o_proj, down_proj and every norm.


@dataclass(frozen=True)
class WidthImportance:
    """Minitron activation importance, averaged over calibration tokens.

    Attributes:
        heads: (n_layers, num_heads) mean L2 norm of each head's output.
        ffn: (n_layers, intermediate_size) mean |activation| of each neuron.
        hidden: (hidden_size,) mean |RMSNorm output| of each channel, summed over all norms.
    """

    heads: Tensor
    ffn: Tensor
    hidden: Tensor


def _importance(model: nn.Module, layout: DecoderLayout, batches: list[Any], show: bool) -> WidthImportance:
    L, H, hd = layout.n_layers, layout.num_heads, layout.head_dim
    heads = torch.zeros(L, H, dtype=torch.float64)
    ffn = torch.zeros(L, layout.intermediate_size, dtype=torch.float64)
    hidden = torch.zeros(layout.hidden_size, dtype=torch.float64)

    def attach(weights: Weights) -> list[RemovableHandle]:
        def add(into: Tensor, x: Tensor) -> None:  # x: (B, T, units), summed over tokens
            into += (x * weights(x).unsqueeze(-1)).sum(dim=(0, 1)).double().cpu()

        handles = []
        for i in range(L):
            attn, mlp = (
                model.get_submodule(f"{layout.layer(i)}.self_attn"),
                model.get_submodule(f"{layout.layer(i)}.mlp"),
            )
            on_heads = lambda _m, a, i=i: add(heads[i], a[0].float().unflatten(-1, (H, hd)).norm(dim=-1))  # noqa: E731
            handles.append(attn.get_submodule("o_proj").register_forward_pre_hook(on_heads))
            on_ffn = lambda _m, a, i=i: add(ffn[i], a[0].float().abs())  # noqa: E731
            handles.append(mlp.get_submodule("down_proj").register_forward_pre_hook(on_ffn))
        norms = [f"{layout.layer(i)}.{n}" for i in range(L) for n in ("input_layernorm", "post_attention_layernorm")]
        for fqn in norms + [layout.norm]:
            handles.append(
                model.get_submodule(fqn).register_forward_hook(lambda _m, _a, o: add(hidden, o.float().abs()))
            )
        return handles

    total = calibration_pass(model, batches, attach, "width importance", show)
    heads, ffn, hidden = (all_reduce_sum(t) for t in (heads, ffn, hidden))
    for name, t in (("attention head outputs", heads), ("FFN activations", ffn), ("norm outputs", hidden)):
        if not torch.isfinite(t).all() or total <= 0:
            raise CalibrationError(f"width importance: {name} are NaN/Inf, or no tokens were seen")
    return WidthImportance((heads / total).float(), (ffn / total).float(), (hidden / total).float())


def width_importance(model: nn.Module, data: Any, *, show_progress: bool = False) -> WidthImportance:
    """Minitron's activation importance of every head, FFN neuron and hidden channel (pure).

    Args:
        model: a Llama-family model.
        data: calibration batches (dicts of `input_ids`, optional `attention_mask`: padded
            tokens are not counted).
    """
    layout = decoder_layout(model, "width_importance")
    return _importance(model, layout, rank_batches(data), show_progress)


# --------------------------------------------------------------------------------------------
# Selection: uniform counts, each block choosing its own units.


def _kept_count(ratio: float, n: int, field: str, where: str, round_to: int = 1) -> int:
    kept = n - math.floor(ratio * n + 0.5)
    kept = min(n, -(-kept // round_to) * round_to) if kept else 0
    if kept == 0:
        raise ConfigError(f"WidthConfig.{field}: {ratio} would remove all {n} {where}; use a smaller ratio")
    return kept


def _top(scores: Tensor, k: int) -> list[int]:
    """Indices of the `k` highest scores, ascending (ties broken by index: deterministic)."""
    order = sorted(range(len(scores)), key=lambda i: (-float(scores[i]), i))
    return sorted(order[:k])


def _select_heads(
    config: WidthConfig, layout: DecoderLayout, scores: Tensor
) -> tuple[list[list[int]], list[list[int]]]:
    """Kept query heads and kept KV heads of every block."""
    kv, group = layout.num_kv_heads, layout.num_heads // layout.num_kv_heads
    where = f"of every block (e.g. {layout.layer(0)}.self_attn)"
    heads, kv_heads = [], []
    if config.head_unit == "kv_group" or group == 1:
        kept = _kept_count(config.heads_ratio, kv, "heads_ratio", f"KV groups {where}")
        for s in scores:
            groups = _top(s.view(kv, group).sum(dim=1), kept)
            kv_heads.append(groups)
            heads.append([g * group + q for g in groups for q in range(group)])
        return heads, kv_heads
    hint = "(head_unit='kv_group' removes whole groups)"
    kept = _kept_count(config.heads_ratio, group, "heads_ratio", f"query heads of each KV group {where} {hint}")
    for s in scores:
        heads.append([g * group + q for g in range(kv) for q in _top(s[g * group : (g + 1) * group], kept)])
        kv_heads.append(list(range(kv)))
    return heads, kv_heads


def _describable_hidden(model: nn.Module, config: WidthConfig, kept: int, heads: int, kv: int) -> int:
    """The smallest hidden width >= `kept` (a multiple of round_to) the HF config accepts.

    transformers 5's `LlamaConfig.validate_architecture` refuses a hidden_size that is not a
    multiple of num_attention_heads, although the model reads the explicit head_dim; a config
    it refuses would not load with `from_pretrained`. So the config's own check decides.
    """
    hf: Any = getattr(model, "config", None)
    dense = hf.hidden_size
    if kept >= dense or not callable(getattr(hf, "validate_architecture", None)):
        return kept
    reason = ""
    for width in range(kept, dense, config.round_to):
        trial = copy.deepcopy(hf)
        trial.hidden_size, trial.num_attention_heads, trial.num_key_value_heads = width, heads, kv
        try:
            trial.validate_architecture()
        except ValueError as err:
            reason = str(err)
            continue
        if width != kept:
            log.warning(
                "WidthConfig: hidden_size %d rounded up to %d for %s (%s)", kept, width, type(hf).__name__, reason
            )
        return width
    raise ConfigError(
        f"WidthConfig.hidden_ratio: {config.hidden_ratio} with round_to {config.round_to}: no hidden_size from {kept} "
        f"below {dense} passes {type(hf).__name__}'s check with {heads} heads ({reason}); change round_to or "
        "heads_ratio so a multiple of both fits"
    )


# --------------------------------------------------------------------------------------------
# The plan step.


class _WidthDoc(BaseModel):
    model_config = ConfigDict(extra="forbid")
    config: dict[str, Any]
    dense: dict[str, int]
    heads: list[list[NonNegativeInt]] | None = None
    kv_heads: list[list[NonNegativeInt]] | None = None
    ffn: list[list[NonNegativeInt]] | None = None
    hidden: list[NonNegativeInt] | None = None


def _check_kept(name: str, kept: list[int], n: int) -> None:
    if not kept or kept != sorted(set(kept)) or kept[-1] >= n:
        raise PlanError(f"width step: {name} must be ascending, distinct, non-empty and below {n}")


@dataclass
class WidthStep:
    """Per block, the query heads, KV heads and FFN neurons kept; the hidden channels kept.

    A field that is None leaves that width alone. Pure data.
    """

    kind: ClassVar[str] = "width"
    config: WidthConfig
    dense: dict[str, int]
    heads: list[list[int]] | None = None
    kv_heads: list[list[int]] | None = None
    ffn: list[list[int]] | None = None
    hidden: list[int] | None = None

    def widths(self) -> dict[str, int]:
        """The widths after this step (`DecoderLayout.dims` keys)."""
        d = dict(self.dense)
        if self.heads is not None:
            d["num_heads"] = len(self.heads[0])
        if self.kv_heads is not None:
            d["num_kv_heads"] = len(self.kv_heads[0])
        if self.ffn is not None:
            d["intermediate_size"] = len(self.ffn[0])
        if self.hidden is not None:
            d["hidden_size"] = len(self.hidden)
        return d

    def describe(self) -> list[str]:
        """Widths before -> after, and which heads and channels go."""
        d, w = self.dense, self.widths()
        rows = [
            f"width (activations, head unit {self.config.head_unit}): "
            + ", ".join(
                f"{k} {d[k]} -> {w[k]}" for k in ("num_heads", "num_kv_heads", "intermediate_size", "hidden_size")
            )
        ]
        if self.heads is not None:
            gone = [sorted(set(range(d["num_heads"])) - set(h)) for h in self.heads]
            rows.append("  query heads removed per block: " + " ".join(f"{i}:{g}" for i, g in enumerate(gone)))
        if self.hidden is not None:
            lost = sorted(set(range(d["hidden_size"])) - set(self.hidden))
            rows.append(f"  hidden channels removed: {lost[:24]}{' ...' if len(lost) > 24 else ''}")
        return rows

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able data (the plan adds the kind)."""
        return {
            "config": config_to_dict(self.config),
            "dense": self.dense,
            "heads": self.heads,
            "kv_heads": self.kv_heads,
            "ffn": self.ffn,
            "hidden": self.hidden,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> WidthStep:
        """Rebuild a step from `to_dict` output; `PlanError` on anything malformed."""
        doc = validate_document(data, _WidthDoc, "LLM plan width step", PlanError)
        config = config_from_dict(doc.config, "width step.config")
        if not isinstance(config, WidthConfig):
            raise PlanError(f"width step.config is a {type(config).__name__}, not a WidthConfig")
        step = cls(config, dict(doc.dense), doc.heads, doc.kv_heads, doc.ffn, doc.hidden)
        step.check()
        return step

    def check(self) -> None:
        """`PlanError` unless every index list fits the dense widths and blocks agree in count."""
        d = self.dense
        for name, rows, n in (
            ("heads", self.heads, "num_heads"),
            ("kv_heads", self.kv_heads, "num_kv_heads"),
            ("ffn", self.ffn, "intermediate_size"),
        ):
            if rows is None:
                continue
            if len(rows) != d.get("n_layers") or len({len(r) for r in rows}) != 1:
                raise PlanError(f"width step: {name} needs one equally long list per block ({d.get('n_layers')})")
            for r in rows:
                _check_kept(name, r, d.get(n, 0))
        if self.hidden is not None:
            _check_kept("hidden", self.hidden, d.get("hidden_size", 0))
        w = self.widths()
        if w["num_heads"] % w["num_kv_heads"]:
            raise PlanError(
                f"width step: {w['num_heads']} query heads are not a multiple of {w['num_kv_heads']} KV heads"
            )

    def slices(self, layout: DecoderLayout) -> Slices:
        """Tensor FQN -> dim -> kept indices, for every tensor this step shrinks (biases included)."""
        out: Slices = {}

        def add(fqns: list[str], dim: int, kept: list[int]) -> None:
            for fqn in fqns:
                out.setdefault(fqn, {})[dim] = kept

        hd = self.dense["head_dim"]
        for i in range(self.dense["n_layers"]):
            a, m = f"{layout.layer(i)}.self_attn", f"{layout.layer(i)}.mlp"
            if self.heads is not None:
                rows = [h * hd + j for h in self.heads[i] for j in range(hd)]
                add([f"{a}.q_proj.weight", f"{a}.q_proj.bias"], 0, rows)
                add([f"{a}.o_proj.weight"], 1, rows)
            if self.kv_heads is not None:
                rows = [h * hd + j for h in self.kv_heads[i] for j in range(hd)]
                add([f"{a}.{p}.{t}" for p in ("k_proj", "v_proj") for t in ("weight", "bias")], 0, rows)
            if self.ffn is not None:
                add([f"{m}.{p}.{t}" for p in ("gate_proj", "up_proj") for t in ("weight", "bias")], 0, self.ffn[i])
                add([f"{m}.down_proj.weight"], 1, self.ffn[i])
            if self.hidden is not None:
                add(
                    [f"{a}.{p}.weight" for p in ("q_proj", "k_proj", "v_proj")]
                    + [f"{m}.{p}.weight" for p in ("gate_proj", "up_proj")],
                    1,
                    self.hidden,
                )
                add(
                    [f"{a}.o_proj.weight", f"{a}.o_proj.bias", f"{m}.down_proj.weight", f"{m}.down_proj.bias"]
                    + [
                        f"{layout.layer(i)}.{n}.{t}"
                        for n in ("input_layernorm", "post_attention_layernorm")
                        for t in ("weight", "bias")
                    ],
                    0,
                    self.hidden,
                )
        if self.hidden is not None:
            add([f"{layout.embed}.weight"] + ([f"{layout.head}.weight"] if layout.head else []), 1, self.hidden)
            add([f"{layout.norm}.weight", f"{layout.norm}.bias"], 0, self.hidden)
        return out

    def apply_to(self, model: nn.Module) -> None:
        """Shrink `model`'s tensors, modules and HF config (mutates); widths are checked first."""
        layout = decoder_layout(model, "WidthConfig")
        check_dims(layout, self.dense, "this width step")
        self.check()
        new = sliced_parameters(model, self.slices(layout))
        for module in model.modules():  # a tied head and embedding share one new tensor
            for name, p in list(module._parameters.items()):
                if p is not None and id(p) in new:
                    module._parameters[name] = new[id(p)]
        _update_modules(model, layout, self.widths())


STEPS.register("width", WidthStep.from_dict)


def _update_modules(model: nn.Module, layout: DecoderLayout, widths: dict[str, int]) -> None:
    """Refresh the shape attributes the modules and the HF config keep (mutates)."""
    for module in model.modules():
        if isinstance(module, nn.Linear):
            module.out_features, module.in_features = module.weight.shape
        elif isinstance(module, nn.Embedding):
            module.embedding_dim = module.weight.shape[1]
    heads, kv = widths["num_heads"], widths["num_kv_heads"]
    for i in range(layout.n_layers):
        layer = model.get_submodule(layout.layer(i))
        values = {
            "hidden_size": widths["hidden_size"],
            "intermediate_size": widths["intermediate_size"],
            "num_heads": heads,
            "num_attention_heads": heads,
            "num_key_value_heads": kv,
            "num_key_value_groups": heads // kv,
        }
        for module in (layer, layer.get_submodule("self_attn"), layer.get_submodule("mlp")):
            for name, value in values.items():
                if isinstance(getattr(module, name, None), int):
                    setattr(module, name, value)
    config: Any = getattr(model, "config", None)
    if config is not None:
        config.hidden_size, config.intermediate_size = widths["hidden_size"], widths["intermediate_size"]
        config.num_attention_heads, config.num_key_value_heads = heads, kv
        config.head_dim = widths["head_dim"]  # explicit: no longer hidden_size // num_attention_heads


@register_method(WidthConfig, per_layer=False)
def plan_width(model: nn.Module, config: WidthConfig, fqns: list[str] | None, ctx: PlanContext) -> LLMPlan:
    """Rank heads, FFN neurons and hidden channels on `ctx.data`; choose what goes (pure).

    Raises:
        ConfigError: not a Llama-family model, or a ratio that would empty a width (every
            query head of a KV group, every KV group, every neuron or channel).
        CalibrationError: no or malformed calibration data, or NaN/Inf activations.
    """
    layout = decoder_layout(model, "WidthConfig")
    d = layout.dims()
    step = WidthStep(config, d)
    # Every count is validated before the calibration pass.
    heads, kv = (
        _select_heads(config, layout, torch.zeros(1, d["num_heads"]))
        if config.heads_ratio
        else ([[0] * d["num_heads"]], [[0] * d["num_kv_heads"]])
    )
    where = f"FFN neurons of every block (e.g. {layout.layer(0)}.mlp)"
    ffn_kept = _kept_count(config.ffn_ratio, d["intermediate_size"], "ffn_ratio", where, config.round_to)
    hidden_kept = _kept_count(config.hidden_ratio, d["hidden_size"], "hidden_ratio", "hidden channels", config.round_to)
    if config.hidden_ratio:
        hidden_kept = _describable_hidden(model, config, hidden_kept, len(heads[0]), len(kv[0]))
    imp = _importance(model, layout, rank_batches(ctx.data), ctx.progress)
    if config.heads_ratio:
        step.heads, step.kv_heads = _select_heads(config, layout, imp.heads)
    if config.ffn_ratio:
        step.ffn = [_top(s, ffn_kept) for s in imp.ffn]
    if config.hidden_ratio:
        step.hidden = _top(imp.hidden, hidden_kept)
    step.check()
    slices = step.slices(layout)
    before, embed = param_counts(model, layout)
    stats = {
        "params_before": before,
        "params_after": before - removed_params(model, slices),
        "embedding_params_before": embed,
        "embedding_params_after": embed - removed_params(model, slices, embedding_ids(model, layout)),
    }
    plan = LLMPlan([step], stats)
    log.info("%s", plan.summary())
    return plan
