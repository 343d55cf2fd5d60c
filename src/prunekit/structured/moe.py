"""Mixture-of-experts compression: remove whole experts and expert FFN neurons of an MoE LM.

transformers 5 stores the routed experts of a sparse block fused: `mlp.experts.gate_up_proj`
(E, 2I, H) (the gate rows, then the up rows), `mlp.experts.down_proj` (E, H, I), and a router
`mlp.gate` whose `weight` (E, H) gives one logit per expert. Two units are removed:

- Whole experts, ranked per MoE layer by how the router uses them on calibration data: the
  heavy-hitters counting of SEER-MoE (Muzio et al. 2024, "SEER-MoE: Sparse Expert Efficiency
  through Regularization for Mixture-of-Experts", arXiv:2404.05089): `criterion="frequency"`
  counts top-k selections (hard counting), `criterion="probability"` sums the router's softmax
  probability (soft counting). The least used experts go: their slices of the fused tensors and
  their router rows. Every router here takes softmax then top-k, so a model without an expert's
  router row is exactly the dense model whose router never selects it.
- Expert FFN neurons, ranked as Minitron ranks FFN neurons (Muralidharan et al. 2024, "Compact
  Language Models via Pruning and Knowledge Distillation"): the mean |act(gate) * up| entering
  `down_proj`, per expert, over the calibration tokens routed to that expert. The fused tensors
  need one width I, so every expert loses the same number of neurons, each choosing its own.
  An expert no calibration token reached is ranked by the norms of its weights instead.

One calibration pass scores both; neurons are chosen for the experts that stay. The Qwen2-MoE
shared expert (a dense MLP every token runs) and the dense `mlp_only_layers` blocks are left
alone. The HF config follows (`num_local_experts` / `num_experts`, `intermediate_size` /
`moe_intermediate_size`), so `save_pretrained` / `from_pretrained` rebuild the pruned model.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, NonNegativeInt, model_validator
from torch import Tensor, nn

from prunekit.config import FrozenConfig, config_from_dict, config_to_dict, recipe_type
from prunekit.core.plan import PlanContext, register_method
from prunekit.errors import ConfigError, PlanError
from prunekit.methods.batches import rank_batches
from prunekit.storage.files import validate_document
from prunekit.structured.llm import STEPS, LLMPlan
from prunekit.structured.moe_routing import ExpertImportance, MoeLayout, moe_layout, routing_importance

log = logging.getLogger(__name__)

@recipe_type
class ExpertConfig(FrozenConfig):
    """Remove whole experts and expert FFN neurons of a mixture-of-experts LM (SEER-MoE, Minitron).

    Args:
        experts_ratio: fraction of the experts removed from every MoE layer, in [0, 1)
            (rounded to the nearest count); or
        n_experts: how many experts to remove from every MoE layer (give at most one of the two).
        neurons_ratio: fraction of every expert's FFN neurons removed, in [0, 1).
        criterion: "frequency" (top-k selections counted) or "probability" (router softmax
            probability summed) over calibration tokens; the lowest go.
        round_to: the kept expert width is rounded up to a multiple of this. transformers'
            default experts kernel (`grouped_mm`) needs rows of whole 16 bytes: 8 suits
            bf16/fp16 and float32; a width it cannot run is refused at plan time.

    Example:
        >>> ExpertConfig(experts_ratio=0.25, neurons_ratio=0.3).criterion
        'frequency'
    """

    experts_ratio: float = Field(default=0.0, ge=0.0, lt=1.0)
    n_experts: int | None = Field(default=None, ge=0)
    neurons_ratio: float = Field(default=0.0, ge=0.0, lt=1.0)
    criterion: Literal["frequency", "probability"] = "frequency"
    round_to: int = Field(default=8, ge=1)

    @model_validator(mode="after")
    def _one_amount(self) -> ExpertConfig:
        if self.n_experts is not None and self.experts_ratio:
            raise ValueError("give at most one of n_experts (a count) or experts_ratio (a fraction)")
        return self


def _experts_removed(config: ExpertConfig, layout: MoeLayout) -> int:
    """Experts to remove from every MoE block; `ConfigError` when too few would stay."""
    e, field = layout.num_experts, "n_experts" if config.n_experts is not None else "experts_ratio"
    n = config.n_experts if config.n_experts is not None else math.floor(config.experts_ratio * e + 0.5)
    value = getattr(config, field)
    where = f"every MoE layer (e.g. {layout.blocks[0]!r})"
    if n >= e:
        raise ConfigError(f"ExpertConfig.{field}: {value} would remove all {e} experts of {where}; remove at most "
                          f"{e - layout.top_k}")
    if e - n < layout.top_k:
        raise ConfigError(f"ExpertConfig.{field}: {value} would leave {e - n} experts in {where}, fewer than "
                          f"num_experts_per_tok {layout.top_k}; remove at most {e - layout.top_k}")
    return n


def _neurons_kept(config: ExpertConfig, layout: MoeLayout) -> int:
    i = layout.intermediate_size
    kept = i - math.floor(config.neurons_ratio * i + 0.5)
    if kept == 0:
        raise ConfigError(f"ExpertConfig.neurons_ratio: {config.neurons_ratio} would remove all {i} neurons of every "
                          f"expert (e.g. {layout.blocks[0]}.experts); use a smaller ratio")
    kept = min(i, -(-kept // config.round_to) * config.round_to)
    size = layout.element_size
    if kept < i and (kept * size) % 16:
        raise ConfigError(f"ExpertConfig.round_to: {config.round_to} gives an expert width of {kept}, {kept * size} "
                          f"bytes a row, which transformers' grouped_mm experts kernel refuses (it needs multiples "
                          f"of 16 bytes); use round_to={16 // math.gcd(16, size)} or a multiple of it")
    return kept


def _top(scores: Tensor, k: int) -> list[int]:
    """Indices of the `k` highest scores, ascending (ties broken by index: deterministic)."""
    return sorted(torch.sort(-scores.double(), stable=True).indices[:k].tolist())


def _weight_scores(experts: Any, e: int) -> Tensor:
    """A data-free neuron score for an expert no token reached: |gate row| * |up row| * |down column|."""
    gate, up = experts.gate_up_proj[e].detach().float().chunk(2, dim=0)
    return gate.norm(dim=1) * up.norm(dim=1) * experts.down_proj[e].detach().float().norm(dim=0)


# --------------------------------------------------------------------------------------------
# The plan step.


class _ExpertDoc(BaseModel):
    model_config = ConfigDict(extra="forbid")
    config: dict[str, Any]
    dense: dict[str, int]
    experts: list[list[NonNegativeInt]] | None = None
    neurons: list[list[list[NonNegativeInt]]] | None = None


def _check_kept(name: str, kept: list[int], n: int) -> None:
    if not kept or kept != sorted(set(kept)) or kept[-1] >= n:
        raise PlanError(f"experts step: {name} must be ascending, distinct, non-empty and below {n}")


@dataclass
class ExpertStep:
    """Per MoE block, the experts kept and, per kept expert, the FFN neurons kept; pure data.

    Attributes:
        config: the config it was planned from.
        dense: the sizes it was planned for (`MoeLayout.dims`), checked before applying.
        experts: per MoE block, kept expert indices (ascending); None keeps every expert.
        neurons: per MoE block, per *kept* expert (in the order of `experts`), kept neuron
            indices (ascending, equally many everywhere); None keeps every neuron.
    """

    kind: ClassVar[str] = "experts"
    config: ExpertConfig
    dense: dict[str, int]
    experts: list[list[int]] | None = None
    neurons: list[list[list[int]]] | None = None

    def sizes(self) -> tuple[int, int]:
        """(experts, expert width) after this step."""
        e = len(self.experts[0]) if self.experts else self.dense["num_experts"]
        i = len(self.neurons[0][0]) if self.neurons else self.dense["expert_intermediate_size"]
        return e, i

    def describe(self) -> list[str]:
        """Sizes before -> after, and which experts go from which block."""
        e, i = self.sizes()
        rows = [f"experts ({self.config.criterion}): {self.dense['moe_blocks']} MoE blocks, experts "
                f"{self.dense['num_experts']} -> {e}, expert width {self.dense['expert_intermediate_size']} -> {i}"]
        if self.experts is not None:
            gone = [sorted(set(range(self.dense["num_experts"])) - set(k)) for k in self.experts]
            rows.append("  experts removed per MoE block: " + " ".join(f"{j}:{g}" for j, g in enumerate(gone)))
        return rows

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able data (the plan adds the kind)."""
        return {"config": config_to_dict(self.config), "dense": self.dense, "experts": self.experts,
                "neurons": self.neurons}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ExpertStep:
        """Rebuild a step from `to_dict` output; `PlanError` on anything malformed."""
        doc = validate_document(data, _ExpertDoc, "LLM plan experts step", PlanError)
        config = config_from_dict(doc.config, "experts step.config")
        if not isinstance(config, ExpertConfig):
            raise PlanError(f"experts step.config is a {type(config).__name__}, not an ExpertConfig")
        step = cls(config, dict(doc.dense), doc.experts, doc.neurons)
        step.check()
        return step

    def check(self) -> None:
        """`PlanError` unless every index list fits the dense sizes and blocks agree in count."""
        d, blocks = self.dense, self.dense.get("moe_blocks")
        if self.experts is not None:
            if len(self.experts) != blocks or len({len(k) for k in self.experts}) != 1:
                raise PlanError(f"experts step: experts needs one equally long list per MoE block ({blocks})")
            for kept in self.experts:
                _check_kept("experts", kept, d.get("num_experts", 0))
        if self.neurons is not None:
            e = self.sizes()[0]
            if len(self.neurons) != blocks or any(len(n) != e for n in self.neurons):
                raise PlanError(f"experts step: neurons needs {e} lists (one per kept expert) per MoE block ({blocks})")
            if len({len(k) for n in self.neurons for k in n}) != 1:
                raise PlanError("experts step: every expert must keep equally many neurons (one fused width)")
            for kept in (k for n in self.neurons for k in n):
                _check_kept("neurons", kept, d.get("expert_intermediate_size", 0))

    def model_dims(self, model: nn.Module) -> dict[str, int]:
        """`model`'s sizes in the form of `dense` (what a replay compares before applying)."""
        return moe_layout(model, "experts step").dims()

    def _tensors(self, model: nn.Module, layout: MoeLayout) -> dict[str, Tensor]:
        """The new router weights and fused expert tensors, by FQN, computed before any change.

        Indexing and gather copy, so the new tensors share no memory with the old ones."""
        out: dict[str, Tensor] = {}
        i, h = layout.intermediate_size, layout.hidden_size
        for j, fqn in enumerate(layout.blocks):
            gate: Any = model.get_submodule(f"{fqn}.gate")
            experts: Any = model.get_submodule(f"{fqn}.experts")
            gate_up, down = experts.gate_up_proj.detach(), experts.down_proj.detach()
            if self.experts is not None:
                keep = torch.as_tensor(self.experts[j], dtype=torch.long, device=gate_up.device)
                out[f"{fqn}.gate.weight"] = gate.weight.detach()[keep.to(gate.weight.device)]
                gate_up, down = gate_up[keep], down[keep.to(down.device)]
            if self.neurons is not None:
                kept = torch.as_tensor(self.neurons[j], dtype=torch.long, device=gate_up.device)  # (E', I')
                rows = torch.cat([kept, kept + i], dim=1)  # the gate rows, then the same up rows
                gate_up = gate_up.gather(1, rows[:, :, None].expand(-1, -1, h))
                down = down.gather(2, kept.to(down.device)[:, None, :].expand(-1, h, -1))
            if self.experts is not None or self.neurons is not None:
                out[f"{fqn}.experts.gate_up_proj"], out[f"{fqn}.experts.down_proj"] = gate_up, down
        return out

    def removed_params(self, layout: MoeLayout) -> int:
        """Parameters this step removes: router rows and slices of the fused expert tensors."""
        e, i = self.sizes()
        before = layout.num_experts * (layout.hidden_size + 3 * layout.intermediate_size * layout.hidden_size)
        return len(layout.blocks) * (before - e * (layout.hidden_size + 3 * i * layout.hidden_size))

    def apply_to(self, model: nn.Module) -> None:
        """Shrink `model`'s routers, experts and HF config (mutates); sizes are checked first."""
        layout = moe_layout(model, "ExpertConfig")
        have = layout.dims()
        if have != self.dense:
            diff = ", ".join(f"{k} {v} (model has {have.get(k)})" for k, v in self.dense.items() if have.get(k) != v)
            raise PlanError(f"this experts step was planned for {diff}: already pruned, or another model?")
        self.check()
        new = self._tensors(model, layout)
        for key, value in new.items():
            owner, _, name = key.rpartition(".")
            module = model.get_submodule(owner)
            old = module._parameters[name]
            module._parameters[name] = nn.Parameter(value, requires_grad=old is None or old.requires_grad)
        _update_sizes(model, layout, *self.sizes())


STEPS.register("experts", ExpertStep.from_dict)


def _update_sizes(model: nn.Module, layout: MoeLayout, experts: int, width: int) -> None:
    """Refresh the size attributes the routers, experts, model and HF config keep (mutates)."""
    for fqn in layout.blocks:
        for part in ("", ".gate", ".experts"):
            module = model.get_submodule(fqn + part)
            for name, value in (("num_experts", experts), ("intermediate_dim", width)):
                if isinstance(getattr(module, name, None), int):
                    setattr(module, name, value)
    owners: list[Any] = [model, getattr(model, "model", None)]
    for owner in owners:  # Qwen2MoeForCausalLM.num_experts: the aux loss
        if isinstance(getattr(owner, "num_experts", None), int):
            owner.num_experts = experts
    config: Any = getattr(model, "config", None)
    if config is not None:
        count_field, width_field = layout.fields
        setattr(config, count_field, experts)
        setattr(config, width_field, width)


def _choose(config: ExpertConfig, layout: MoeLayout, imp: ExpertImportance, n: int) -> list[list[int]]:
    """Kept experts per block: all but the `n` least used (ties: the other criterion, then index)."""
    first, second = (imp.frequency, imp.probability) if config.criterion == "frequency" else (
        imp.probability, imp.frequency)
    return [sorted(sorted(range(layout.num_experts), key=lambda e: (float(a[e]), float(b[e]), e))[n:])
            for a, b in zip(first, second, strict=True)]


def _choose_neurons(model: nn.Module, layout: MoeLayout, imp: ExpertImportance, experts: list[list[int]],
                    k: int) -> list[list[list[int]]]:
    """Kept neurons of every kept expert; an expert no token reached is ranked by its weights."""
    unseen = []
    out = []
    for j, fqn in enumerate(layout.blocks):
        mod = model.get_submodule(f"{fqn}.experts")
        rows = []
        for e in experts[j]:
            seen = float(imp.tokens[j, e]) > 0
            rows.append(_top(imp.neurons[j, e] if seen else _weight_scores(mod, e), k))
            unseen += [] if seen else [f"{fqn}.experts[{e}]"]
        out.append(rows)
    if unseen:
        log.warning("ExpertConfig: no calibration token reached %d kept expert(s) (e.g. %s); their neurons are ranked "
                    "by weight norms instead; give more calibration data", len(unseen), unseen[0])
    return out


def _embedding_params(model: Any) -> int:
    ids = {id(m.weight): m.weight.numel() for m in (model.get_input_embeddings(), model.get_output_embeddings())
           if isinstance(getattr(m, "weight", None), Tensor)}
    return sum(ids.values())


@register_method(ExpertConfig, per_layer=False)
def plan_experts(model: nn.Module, config: ExpertConfig, fqns: list[str] | None, ctx: PlanContext) -> LLMPlan:
    """Rank experts by router usage and expert neurons by activation on `ctx.data`; choose (pure).

    Raises:
        ConfigError: not a supported MoE model (the message names its class), fewer experts
            than num_experts_per_tok would stay, or a ratio would empty a layer or an expert.
        CalibrationError: no or malformed calibration data, or NaN/Inf activations.
    """
    layout = moe_layout(model, "ExpertConfig")
    n = _experts_removed(config, layout)  # every count is validated before the calibration pass
    width = _neurons_kept(config, layout)
    step = ExpertStep(config, layout.dims())
    if n or width < layout.intermediate_size:
        imp = routing_importance(model, layout, rank_batches(ctx.data), ctx.progress, width < layout.intermediate_size)
        kept = _choose(config, layout, imp, n)
        step.experts = kept if n else None
        if width < layout.intermediate_size:
            step.neurons = _choose_neurons(model, layout, imp, kept, width)
    step.check()
    before = sum({id(p): p.numel() for p in model.parameters()}.values())
    embed = _embedding_params(model)
    stats = {"params_before": before, "params_after": before - step.removed_params(layout),
             "embedding_params_before": embed, "embedding_params_after": embed}
    plan = LLMPlan([step], stats)
    log.info("%s", plan.summary())
    return plan
