"""Per-layer removal handlers: which tensor dims a layer can lose, and how it stays consistent.

A handler answers three questions about one module type (Torch-Pruning's per-layer pruning
functions, reduced to data plus one hook): which of its tensors' dims may shrink, which dim
indexes its *output* channels (what `exclude` protects), and how to update shape metadata
(`out_channels`, `groups`, `num_heads`...) once its tensors were sliced. Modules are looked
up by type along the MRO, then by class name for optional libraries (transformers) so that
importing prunekit never imports them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import nn

from prunekit._registry import Registry
from prunekit.errors import ConfigError

Dims = dict[str, tuple[int, ...]]


@dataclass(frozen=True)
class LayerHandler:
    """How one layer type is structurally pruned.

    Attributes:
        shrinkable: module -> {tensor name: dims that may shrink}.
        outputs: module -> {tensor name: the dim that indexes output channels}.
        update: fix the module's shape attributes after its tensors were sliced (mutates).
    """

    shrinkable: Callable[[Any], Dims]
    outputs: Callable[[Any], dict[str, int]]
    update: Callable[[Any], None]


LAYER_HANDLERS: Registry[type | str, LayerHandler] = Registry("layer handler")
"""Module type (matched along the MRO) or class name (optional libraries) -> its handler."""


def register_layer_handler(
    key: type | str, *, shrinkable: Callable[[Any], Dims], outputs: Callable[[Any], dict[str, int]]
) -> Callable[[Callable[[Any], None]], Callable[[Any], None]]:
    """Decorator on an `update(module)` function: register a handler for a type or class name.

    Example:
        >>> @register_layer_handler("MyNorm", shrinkable=lambda m: {"weight": (0,)}, outputs=lambda m: {})
        ... def _update_my_norm(module): module.dim = module.weight.shape[0]
    """

    def wrap(update: Callable[[Any], None]) -> Callable[[Any], None]:
        LAYER_HANDLERS.register(key, LayerHandler(shrinkable, outputs, update))
        return update

    return wrap


def get_layer_handler(module: nn.Module | None) -> LayerHandler | None:
    """The handler for `module`'s type (nearest in the MRO), else by class name, else None."""
    if module is None:
        return None
    for cls in type(module).__mro__:
        for key in (cls, cls.__name__):
            handler = LAYER_HANDLERS.find(key)
            if handler is not None:
                return handler
    return None


def list_layer_handlers() -> list[str]:
    """Names of the module types with a handler, sorted."""
    return LAYER_HANDLERS.names()


def owner_of(tensor_fqn: str) -> tuple[str, str]:
    """('layer.fqn', 'weight') from 'layer.fqn.weight'."""
    layer, _, name = tensor_fqn.rpartition(".")
    return layer, name


def _dims(**names: tuple[int, ...]) -> Callable[[Any], Dims]:
    return lambda module: dict(names)


# --------------------------------------------------------------------------------------------
# torch.nn layers.


@register_layer_handler(nn.Linear, shrinkable=_dims(weight=(0, 1), bias=(0,)), outputs=lambda m: {"weight": 0})
def _update_linear(module: nn.Linear) -> None:
    module.out_features, module.in_features = module.weight.shape


def _conv_dims(module: nn.modules.conv._ConvNd) -> Dims:
    return {"weight": (0, 1), "bias": (0,)}


@register_layer_handler(nn.modules.conv._ConvNd, shrinkable=_conv_dims, outputs=lambda m: {"weight": 0})
def _update_conv(module: nn.modules.conv._ConvNd) -> None:
    if isinstance(module, nn.modules.conv._ConvTransposeNd):
        raise ConfigError(f"transposed convolutions are not structurally pruned ({type(module).__name__})")
    out = module.weight.shape[0]
    depthwise = module.groups > 1 and module.groups == module.in_channels and module.weight.shape[1] == 1
    if depthwise:
        multiplier = module.out_channels // module.in_channels
        module.groups = module.in_channels = out // multiplier
    else:
        module.in_channels = module.weight.shape[1] * module.groups
    module.out_channels = out


@register_layer_handler(
    nn.modules.batchnorm._NormBase,
    shrinkable=_dims(weight=(0,), bias=(0,), running_mean=(0,), running_var=(0,)),
    outputs=lambda m: {},
)
def _update_batch_norm(module: nn.modules.batchnorm._NormBase) -> None:
    module.num_features = (module.running_mean if module.running_mean is not None else module.weight).shape[0]


@register_layer_handler(nn.LayerNorm, shrinkable=_dims(weight=(0,), bias=(0,)), outputs=lambda m: {})
def _update_layer_norm(module: nn.LayerNorm) -> None:
    if module.weight is not None:
        module.normalized_shape = (module.weight.shape[0],) + tuple(module.normalized_shape[1:])


@register_layer_handler(nn.Embedding, shrinkable=_dims(weight=(1,)), outputs=lambda m: {"weight": 1})
def _update_embedding(module: nn.Embedding) -> None:
    module.embedding_dim = module.weight.shape[1]


def _rnn_names(module: nn.RNNBase) -> list[str]:
    return [n for n in module._flat_weights_names if getattr(module, n, None) is not None]


def _rnn_dims(module: nn.RNNBase) -> Dims:
    if getattr(module, "proj_size", 0):  # LSTM projections: h has proj_size units, c hidden_size
        return {}
    return {n: (0, 1) if n.startswith("weight") else (0,) for n in _rnn_names(module)}


def _rnn_outputs(module: nn.RNNBase) -> dict[str, int]:
    return {n: 0 for n in _rnn_names(module) if n.startswith("weight_hh")}


@register_layer_handler(nn.RNNBase, shrinkable=_rnn_dims, outputs=_rnn_outputs)
def _update_rnn(module: Any) -> None:
    module.hidden_size = module.weight_hh_l0.shape[1]
    module.input_size = module.weight_ih_l0.shape[1]
    module._init_flat_weights()  # the forward reads this list, not the attributes


def _parametrized_dims(module: Any) -> Dims:
    """weight_norm's g (original0) and v (original1) shrink along its `dim`; other parametrizations do not."""
    if len(module) != 1 or type(module[0]).__name__ != "_WeightNorm" or getattr(module[0], "dim", -1) == -1:
        return {}
    dim = module[0].dim
    return {"original0": (dim,), "original1": (dim,)}


@register_layer_handler(
    nn.utils.parametrize.ParametrizationList,
    shrinkable=_parametrized_dims,
    outputs=lambda m: {"original1": 0} if _parametrized_dims(m).get("original1") == (0,) else {},
)
def _update_parametrization(module: Any) -> None:
    """Nothing to refresh here: `ChannelPlan.apply` updates the layer it parametrizes."""


# --------------------------------------------------------------------------------------------
# transformers layers, by class name (imported lazily by whoever builds the model).


@register_layer_handler("Conv1D", shrinkable=_dims(weight=(0, 1), bias=(0,)), outputs=lambda m: {"weight": 1})
def _update_hf_conv1d(module: Any) -> None:
    module.nf = module.weight.shape[1]
    if hasattr(module, "nx"):
        module.nx = module.weight.shape[0]


def _no_tensors(module: Any) -> Dims:
    return {}


@register_layer_handler("BertSelfAttention", shrinkable=_no_tensors, outputs=lambda m: {})
def _update_bert_attention(module: Any) -> None:
    module.num_attention_heads = module.query.out_features // module.attention_head_size
    module.all_head_size = module.num_attention_heads * module.attention_head_size


def _update_q_proj_attention(module: Any) -> None:
    heads = module.q_proj.out_features // module.head_dim
    kv_heads = module.k_proj.out_features // module.head_dim
    for name, value in (("num_heads", heads), ("num_attention_heads", heads), ("num_key_value_heads", kv_heads)):
        if isinstance(getattr(module, name, None), int):
            setattr(module, name, value)
    if hasattr(module, "num_key_value_groups"):
        module.num_key_value_groups = heads // max(kv_heads, 1)


_Q_PROJ_ATTENTION = (
    "LlamaAttention",
    "MistralAttention",
    "Qwen2Attention",
    "Qwen3Attention",
    "ViTSelfAttention",
    "SwinAttention",
)
for _name in _Q_PROJ_ATTENTION:
    register_layer_handler(_name, shrinkable=_no_tensors, outputs=lambda m: {})(_update_q_proj_attention)


@register_layer_handler("T5Attention", shrinkable=_no_tensors, outputs=lambda m: {})
def _update_t5_attention(module: Any) -> None:
    module.n_heads = module.q.out_features // module.key_value_proj_dim
    module.inner_dim = module.n_heads * module.key_value_proj_dim


@register_layer_handler(
    "SwinRelativePositionBias", shrinkable=_dims(relative_position_bias_table=(1,)), outputs=lambda m: {}
)
def _update_swin_position_bias(module: Any) -> None:
    """The (positions, heads) table lost the pruned heads' columns; its forward views with -1."""


@register_layer_handler("GPT2Attention", shrinkable=_no_tensors, outputs=lambda m: {})
def _update_gpt2_attention(module: Any) -> None:
    width = module.c_attn.nf // 3
    module.split_size = width
    module.num_heads = width // module.head_dim


def is_attention_holder(module: nn.Module) -> bool:
    """True for modules whose handler owns no tensors (only metadata to refresh)."""
    handler = get_layer_handler(module)
    return handler is not None and handler.shrinkable is _no_tensors
