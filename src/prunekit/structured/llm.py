"""Structured compression of Llama-family language models: the decoder layout and `LLMPlan`.

Two methods shrink a decoder-only language model into a smaller model of the *same*
architecture, so `save_pretrained` / `from_pretrained` rebuild it from its config alone:

- depth (`structured/depth.py`): remove whole decoder blocks ranked by block influence
  (ShortGPT, Men et al. 2024; Gromov et al. 2024);
- width (`structured/width.py`): remove attention heads, FFN neurons and hidden channels ranked
  by calibration activations (Minitron, Muralidharan et al. 2024).

This module holds what both share: finding the decoder stack of a supported model
(`decoder_layout`), counting parameters, and the plan (`LLMPlan`, a list of steps that prints,
serialises, replays on a fresh dense model, and applies all-or-nothing).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal, Protocol, cast

import torch
from pydantic import BaseModel, ConfigDict
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from prunekit._registry import Registry
from prunekit.core.distributed import all_reduce_sum
from prunekit.core.inputs import call_model, to_model_device
from prunekit.core.progress import progress
from prunekit.errors import ConfigError, PlanError
from prunekit.storage.files import JsonDocument, validate_document
from prunekit.structured.rollback import restore, snapshot

FORMAT = "prunekit.llm_plan"
FORMAT_VERSION = 1
# Families whose decoder layer is exactly: self_attn.{q,k,v,o}_proj (+ optional biases and
# head-wide q/k norms), mlp.{gate,up,down}_proj, input/post_attention RMSNorm, and whose
# attention reads `config.head_dim`. Others (Gemma scales embeddings by sqrt(hidden_size),
# OLMo-2 normalises after the sublayers, ...) need their own rules before they can be listed.
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")
Slices = dict[str, dict[int, list[int]]]  # tensor FQN -> dim -> kept indices


# --------------------------------------------------------------------------------------------
# The decoder stack of a supported model.


@dataclass(frozen=True)
class DecoderLayout:
    """Where the parts of a Llama-family model live, and its (uniform) widths.

    Attributes:
        prefix: "model." for a `*ForCausalLM`, "" for a bare `*Model`.
        head: FQN of the output head ("lm_head"), or None for a bare model.
        n_layers, hidden_size, num_heads, num_kv_heads, head_dim, intermediate_size: read
            from the modules (not the config), so a plan is checked against what is really there.
    """

    prefix: str
    head: str | None
    n_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int

    def layer(self, i: int) -> str:
        """FQN of decoder block `i`."""
        return f"{self.prefix}layers.{i}"

    @property
    def layers(self) -> str:
        return f"{self.prefix}layers"

    def blocks(self, model: nn.Module) -> nn.ModuleList:
        """The decoder blocks of `model`."""
        return cast(nn.ModuleList, model.get_submodule(self.layers))

    @property
    def embed(self) -> str:
        return f"{self.prefix}embed_tokens"

    @property
    def norm(self) -> str:
        return f"{self.prefix}norm"

    def dims(self) -> dict[str, int]:
        """The widths a plan step records and checks before it is applied."""
        return {
            "n_layers": self.n_layers,
            "hidden_size": self.hidden_size,
            "num_heads": self.num_heads,
            "num_kv_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "intermediate_size": self.intermediate_size,
        }


_LAYER_PARTS = (
    "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
    "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj", "input_layernorm", "post_attention_layernorm",
)  # fmt: skip


def _layer_widths(fqn: str, layer: nn.Module) -> tuple[int, int, int, int]:
    for part in _LAYER_PARTS:
        try:
            layer.get_submodule(part)
        except AttributeError:
            raise ConfigError(f"decoder block {fqn!r} has no {part!r}: not a Llama-family layer") from None
    attn: Any = layer.get_submodule("self_attn")
    hd = attn.head_dim
    gate: Any = layer.get_submodule("mlp.gate_proj")
    q, k, f = attn.q_proj.out_features, attn.k_proj.out_features, gate.out_features
    if not isinstance(hd, int) or q % hd or k % hd or k == 0 or (q // hd) % (k // hd):
        raise PlanError(f"{fqn}.self_attn: q/k widths {q}/{k} are not whole heads of {hd} in whole KV groups")
    return q // hd, k // hd, hd, f


def layer_stack(model: nn.Module, owner: str) -> tuple[nn.Module, str, Any]:
    """(the module holding a Hugging Face LM's `layers`, its FQN prefix, the layers or None).

    Raises:
        ConfigError: masks are attached (plans slice plain weights; finalize first).
    """
    if any(hasattr(m, "parametrizations") for m in model.modules()):
        raise ConfigError(f"{owner}: the model has masks attached; call prunekit.finalize(model) first")
    inner = getattr(model, "model", None)
    if isinstance(inner, nn.Module) and isinstance(getattr(inner, "layers", None), nn.ModuleList):
        return inner, "model.", inner.layers
    return model, "", getattr(model, "layers", None)


def decoder_layout(model: nn.Module, owner: str) -> DecoderLayout:
    """Find the decoder stack of a supported model and read its widths (pure).

    Args:
        model: a Llama-family `*ForCausalLM` or bare `*Model` from transformers.
        owner: the config name for error messages ("DepthConfig").

    Raises:
        ConfigError: not a supported family, masks still attached, or a block lacks a part.
        PlanError: the blocks differ in width (pruned non-uniformly before), so neither the
            HF config nor a uniform plan can describe them.
    """
    config: Any = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ConfigError(
            f"{owner}: supports Llama-family decoders (model_type {', '.join(SUPPORTED_MODEL_TYPES)}); "
            f"{type(model).__name__} has model_type {model_type!r}. Use ChannelConfig for other models"
        )
    base, prefix, layers = layer_stack(model, owner)
    embed = getattr(base, "embed_tokens", None)
    if not isinstance(layers, nn.ModuleList) or not len(layers) or not isinstance(embed, nn.Embedding):
        raise ConfigError(f"{owner}: {type(model).__name__} has no {prefix}layers / {prefix}embed_tokens stack")
    widths = {i: _layer_widths(f"{prefix}layers.{i}", layer) for i, layer in enumerate(layers)}
    if len(set(widths.values())) > 1:
        first, other = 0, next(i for i, w in widths.items() if w != widths[0])
        raise PlanError(
            f"{owner}: decoder blocks differ in width ({prefix}layers.{first}: {widths[first]}, "
            f"{prefix}layers.{other}: {widths[other]} as (heads, kv heads, head_dim, ffn)); "
            "the HF config cannot describe them, and LLM plans need uniform blocks"
        )
    heads, kv, hd, ffn = widths[0]
    head = "lm_head" if isinstance(getattr(model, "lm_head", None), nn.Linear) else None
    return DecoderLayout(prefix, head, len(layers), embed.weight.shape[1], heads, kv, hd, ffn)


def check_dims(layout: DecoderLayout, expected: dict[str, int], what: str) -> None:
    """Raise `PlanError` unless the model's widths are the ones a plan step was made for."""
    have = layout.dims()
    wrong = {k: (v, have.get(k)) for k, v in expected.items() if have.get(k) != v}
    if wrong:
        diff = ", ".join(f"{k} {v} (model has {h})" for k, (v, h) in wrong.items())
        raise PlanError(f"{what} was planned for {diff}: already pruned, or another model?")


def embedding_ids(model: nn.Module, layout: DecoderLayout) -> set[int]:
    """Ids of the embedding table and of the output head's weight (one id when they are tied)."""
    ids = {id(model.get_submodule(layout.embed).weight)}
    if layout.head is not None:
        ids.add(id(model.get_submodule(layout.head).weight))
    return ids


def param_counts(model: nn.Module, layout: DecoderLayout) -> tuple[int, int]:
    """(all parameters, embedding parameters), each shared tensor once (a tied head counts once)."""
    params = {id(p): p.numel() for p in model.parameters()}
    return sum(params.values()), sum(params.get(i, 0) for i in embedding_ids(model, layout))


def sliced_parameters(model: nn.Module, slices: Slices) -> dict[int, nn.Parameter]:
    """New parameters, keyed by id of the one each replaces, sliced as `slices` says (pure).

    Computed and checked before anything changes. A missing `.bias` is skipped (the family's
    layers may have none); a tensor tied under several names must be sliced the same under each.
    """
    tensors = dict(model.named_parameters(remove_duplicate=False))
    names: dict[int, list[str]] = {}
    for key, t in tensors.items():
        names.setdefault(id(t), []).append(key)
    out: dict[int, nn.Parameter] = {}
    for key, dims in slices.items():
        t = tensors.get(key)  # type: ignore[assignment]
        if t is None:
            if key.endswith(".bias"):
                continue
            raise PlanError(f"width step names tensor {key!r}, which this model does not have")
        for alias in names[id(t)]:  # a tied tensor must shrink the same way under every name
            if slices.get(alias) != dims:
                raise PlanError(f"{key!r} is tied to {alias!r}, which the width step shrinks differently")
        if id(t) in out:
            continue
        value = t.detach()
        for dim, kept in dims.items():
            if max(kept) >= value.shape[dim]:
                raise PlanError(f"tensor {key!r}: kept index {max(kept)} out of range on dim {dim}")
            value = value.index_select(dim, torch.as_tensor(kept, dtype=torch.long, device=t.device))
        out[id(t)] = nn.Parameter(value.clone(), requires_grad=t.requires_grad)
    return out


def removed_params(model: nn.Module, slices: Slices, ids: set[int] | None = None) -> int:
    """Parameters `slices` removes (each shared tensor once); only tensors in `ids` if given."""
    tensors = dict(model.named_parameters(remove_duplicate=False))
    seen: dict[int, int] = {}
    for key, dims in slices.items():
        t = tensors.get(key)
        if t is None or (ids is not None and id(t) not in ids):
            continue
        shape = [len(dims[d]) if d in dims else n for d, n in enumerate(t.shape)]
        seen[id(t)] = t.numel() - math.prod(shape)
    return sum(seen.values())


def token_weights(batch: Any, hidden: Tensor) -> Tensor:
    """Per-token weights (B, T) for averaging: the batch's attention_mask, else all ones."""
    mask = batch.get("attention_mask") if isinstance(batch, dict) else None
    if isinstance(mask, Tensor) and mask.shape == hidden.shape[:2]:
        return mask.to(device=hidden.device, dtype=torch.float32)
    return torch.ones(hidden.shape[:2], device=hidden.device)


Weights = Callable[[Tensor], Tensor]  # hidden state (B, T, ...) -> the current batch's token weights (B, T)


@torch.no_grad()
def calibration_pass(
    model: nn.Module,
    batches: list[Any],
    attach: Callable[[Weights], list[RemovableHandle]],
    desc: str,
    show: bool,
    reset: Callable[[], None] | None = None,
) -> float:
    """Feed `batches` through `model` in eval mode with the hooks `attach(weights)` registers.

    The hooks accumulate their own sums, weighting tokens by `weights(hidden)` (padding masked
    out); `reset` runs before each batch. Hooks are removed and the mode restored afterwards.

    Returns:
        The weighted token count, summed over ranks under torchrun (hooks sum their own stats).
    """
    current: dict[str, Any] = {}

    def weights(hidden: Tensor) -> Tensor:
        return current.setdefault("w", token_weights(current["batch"], hidden))

    handles = attach(weights)
    training = model.training
    model.eval()
    total = 0.0
    try:
        for batch in progress(batches, desc, show):
            current.clear()
            current["batch"] = batch
            if reset is not None:
                reset()
            call_model(model, to_model_device(model, batch))
            total += float(current["w"].sum()) if "w" in current else 0.0
    finally:
        model.train(training)
        for handle in handles:
            handle.remove()
    return float(all_reduce_sum(torch.tensor(total, dtype=torch.float64)))


# --------------------------------------------------------------------------------------------
# The plan: a list of steps, applied in order, all or nothing.


class PlanStep(Protocol):
    """One step of an `LLMPlan` (a `DepthStep`, `WidthStep`, `StateSpaceStep`, ...).

    A step of a family that `DecoderLayout` does not describe (Mamba, MoE experts) also has
    `model_dims(model) -> dict[str, int]`: the widths `dense` is compared with on replay.
    """

    kind: ClassVar[str]
    dense: dict[str, int]  # the widths it was planned for (`DecoderLayout.dims`, or the step's `model_dims`)

    def describe(self) -> list[str]: ...

    def to_dict(self) -> dict[str, Any]: ...

    def apply_to(self, model: nn.Module) -> None: ...


StepLoader = Callable[[dict[str, Any]], PlanStep]
STEPS: Registry[str, StepLoader] = Registry("LLM plan step")
"""Step kind ("depth", "width") -> how to rebuild it from its `to_dict` data."""


class _Document(BaseModel):
    model_config = ConfigDict(extra="forbid")
    format: Literal["prunekit.llm_plan"]
    version: Literal[1]
    steps: list[dict[str, Any]]
    stats: dict[str, int] = {}


@dataclass
class LLMPlan(JsonDocument):
    """What depth and width compression remove from a Llama-family model; pure data.

    Attributes:
        steps: applied in order; `a.then(b)` chains a plan made on the model `a` produced.
        stats: params_before/after and embedding_params_before/after (tied head counted once).

    Example:
        >>> plan = prunekit.plan(model, DepthConfig(n_blocks=2), data=batches)  # doctest: +SKIP
        >>> print(plan.summary()); plan.apply(model)                             # doctest: +SKIP
    """

    document_name = "LLM plan"
    document_error = PlanError

    steps: list[PlanStep]
    stats: dict[str, int] = field(default_factory=dict)

    def then(self, other: LLMPlan) -> LLMPlan:
        """A plan applying this plan's steps, then `other`'s (planned on the result of this one)."""
        stats = {k: v for k, v in self.stats.items() if k.endswith("_before")}
        stats |= {k: v for k, v in other.stats.items() if k.endswith("_after")}
        return LLMPlan(list(self.steps) + list(other.steps), stats)

    def summary(self) -> str:
        """The steps (blocks, heads, neurons, channels removed), then params before -> after."""
        rows = [f"LLMPlan: {len(self.steps)} step(s)"]
        for step in self.steps:
            rows += [f"  {line}" for line in step.describe()]
        s = self.stats
        if "params_before" in s:
            before, after = s["params_before"], s["params_after"]
            rows.append(f"  params {before:,} -> {after:,} ({after / max(before, 1):.1%})")
            nb, na = before - s["embedding_params_before"], after - s["embedding_params_after"]
            rows.append(f"  without embeddings {nb:,} -> {na:,} ({na / max(nb, 1):.1%})")
        return "\n".join(rows)

    def __str__(self) -> str:
        return self.summary()

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able data, tagged with format and version."""
        steps = [{"kind": step.kind, **step.to_dict()} for step in self.steps]
        return {"format": FORMAT, "version": FORMAT_VERSION, "steps": steps, "stats": dict(self.stats)}

    @classmethod
    def from_dict(cls, data: Any) -> LLMPlan:
        """Rebuild a plan from `to_dict` output; `PlanError` names what is malformed."""
        doc = validate_document(data, _Document, "LLM plan", PlanError)
        steps = []
        for i, step in enumerate(doc.steps):
            kind = step.get("kind")
            loader = STEPS.find(kind) if isinstance(kind, str) else None
            if loader is None:
                raise PlanError(f"LLM plan step {i}: unknown kind {kind!r}; known: {', '.join(STEPS.names())}")
            steps.append(loader({k: v for k, v in step.items() if k != "kind"}))
        return cls(steps, dict(doc.stats))

    def apply(self, model: nn.Module) -> nn.Module:
        """Remove the planned blocks/heads/neurons/channels from `model` (mutates, returns it).

        All or nothing: each step checks the model's widths first, and any failure restores
        every module, tensor and config field as it was.

        Raises:
            PlanError: the model is not the one planned for (another width, already pruned),
                or a step failed; the model is left unchanged.
        """
        saved = snapshot(model)
        try:
            for step in self.steps:
                step.apply_to(model)
        except Exception as err:
            restore(saved)
            if isinstance(err, (PlanError, ConfigError)):
                raise
            raise PlanError(f"applying the LLM plan failed and was rolled back: {err}") from err
        return model


def replay_llm_plan(plan_data: dict[str, Any], model: nn.Module) -> nn.Module:
    """Apply a saved `LLMPlan` to `model` unless it already has other widths (mutates, returns).

    What `prunekit.load(path, build_dense)` needs for a checkpoint saved with `plan=LLMPlan`:
    a freshly built dense model gets the plan; a model whose widths are not the ones the first
    step was planned for is returned unchanged (the load's own shape check then decides).
    """
    plan = LLMPlan.from_dict(plan_data)
    if plan.steps:
        first = plan.steps[0]
        model_dims = getattr(first, "model_dims", None)  # a step of another family reads its own widths
        have = model_dims(model) if callable(model_dims) else decoder_layout(model, "LLM plan").dims()
        if have != first.dense:
            return model
    return plan.apply(model)


