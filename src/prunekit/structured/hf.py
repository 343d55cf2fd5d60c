"""Keep a pruned Hugging Face model's `config` true, so `save_pretrained` / `from_pretrained` work.

transformers builds every layer from one config, so a field can follow the pruned model only
when all layers agree (uniform `scope="layer"` pruning gives that). When they do not, the
field is left alone and `prunekit.load` (which replays the plan) is the way to rebuild.

Head pruning has a second limit. Llama-family and ViT attention read `config.head_dim`, so
fewer heads of the same size round-trip through `save_pretrained`/`from_pretrained`. BERT and
GPT-2 attention in transformers 5.x derive the head size as `hidden_size // num_attention_heads`
and size q/k/v as `hidden_size` wide; `config.pruned_heads` and `prune_heads()` were removed in
5.0, and no other field sets the head size. So no config describes a head-pruned BERT/GPT-2:
`from_pretrained` then stops with its size-mismatch error (it does not load silently). The
config is still written truthfully (`num_attention_heads`, `head_dim`), a warning says so at
apply time, and `prunekit.save(model, path, plan=plan)` / `prunekit.load(path, build_dense)`
is the way to rebuild them. FFN-only pruning of BERT/GPT-2 round-trips through
`from_pretrained` (`intermediate_size` / `n_inner`).
"""

from __future__ import annotations

import copy
import logging
from typing import Any

import torch
from torch import nn

log = logging.getLogger(__name__)

# (config field, how to read it from one module); a module answers None when it does not apply.
_FFN_CHILDREN = ("gate_proj", "up_proj", "fc1")
_WARNED: set[tuple[str, str]] = set()


def _ffn_width(fqn: str, module: Any) -> int | None:
    if fqn.endswith("intermediate.dense") and isinstance(module, nn.Linear):
        return module.out_features
    if fqn.endswith("mlp") and any(isinstance(getattr(module, c, None), nn.Linear) for c in _FFN_CHILDREN):
        child = next(getattr(module, c) for c in _FFN_CHILDREN if isinstance(getattr(module, c, None), nn.Linear))
        return child.out_features
    if fqn.endswith("mlp") and hasattr(getattr(module, "c_fc", None), "nf"):
        return module.c_fc.nf
    if fqn.endswith("DenseReluDense"):  # T5: wi (or gated wi_0/wi_1) -> wo
        child = next((getattr(module, c) for c in ("wi", "wi_0") if isinstance(getattr(module, c, None), nn.Linear)),
                     None)
        return child.out_features if child is not None else None
    return None


def _heads(module: Any) -> tuple[int, int | None, int] | None:
    """(query heads, key/value heads or None, head dim) of an attention module."""
    if hasattr(module, "attention_head_size") and isinstance(getattr(module, "query", None), nn.Linear):
        size = module.attention_head_size
        return module.query.out_features // size, None, size
    if isinstance(getattr(module, "q_proj", None), nn.Linear) and isinstance(getattr(module, "head_dim", None), int):
        hd = module.head_dim
        return module.q_proj.out_features // hd, module.k_proj.out_features // hd, hd
    if hasattr(module, "c_attn") and isinstance(getattr(module, "head_dim", None), int):
        return module.c_attn.nf // 3 // module.head_dim, None, module.head_dim
    size = getattr(module, "key_value_proj_dim", None)  # T5
    if isinstance(getattr(module, "q", None), nn.Linear) and isinstance(size, int):
        return module.q.out_features // size, None, size
    return None


def shapes_config_cannot_rebuild(model: nn.Module) -> list[str]:
    """Tensors whose shape `type(model)(model.config)` would build differently (pure check).

    The model is rebuilt on the meta device (no memory, no weights), which is exactly what
    `from_pretrained` does first; tensors the rebuild lacks or adds (constructor arguments
    such as `add_pooling_layer`) are not compared.

    Returns:
        Tensor FQNs with a different shape (all of them when the config does not even build);
        empty when `save_pretrained`/`from_pretrained` will round-trip the shapes.
    """
    config: Any = getattr(model, "config", None)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    try:
        with torch.device("meta"):
            rebuilt = type(model)(copy.deepcopy(config))
    except Exception as err:  # e.g. hidden_size not divisible by the new head count
        log.debug("rebuilding %s from its config failed: %s", type(model).__name__, err)
        return sorted(shapes)
    return sorted(k for k, v in rebuilt.state_dict().items() if k in shapes and tuple(v.shape) != shapes[k])


def update_config(model: nn.Module) -> list[str]:
    """Set the HF config's size fields from the (pruned) modules, where uniform (mutates).

    Returns:
        Names of fields that could not be set because layers differ, plus "head_dim" when a
        model rebuilt from the config would have other shapes (empty when `from_pretrained`
        will rebuild the model).
    """
    config: Any = getattr(model, "config", None)
    if config is None or not hasattr(config, "to_dict"):
        return []
    ffn = {w for fqn, m in model.named_modules() if (w := _ffn_width(fqn, m)) is not None}
    heads = {h for m in model.modules() if (h := _heads(m)) is not None}
    skipped = []
    ffn_field = next((f for f in ("d_ff", "n_inner") if hasattr(config, f)), "intermediate_size")
    if len(ffn) == 1:
        setattr(config, ffn_field, ffn.pop())
    elif ffn:
        skipped.append(ffn_field)
    if heads and not isinstance(getattr(config, "num_attention_heads", None), int):
        skipped.append("num_attention_heads")  # one count per stage (Swin's num_heads list)
    elif len(heads) == 1:
        q, kv, hd = heads.pop()
        if q != config.num_attention_heads:
            config.num_attention_heads = q
            # Configs derive head_dim from hidden_size / heads unless it is stored explicitly.
            config.head_dim = hd
        if kv is not None and hasattr(config, "num_key_value_heads"):
            config.num_key_value_heads = kv
    elif heads:
        skipped.append("num_attention_heads")
    mismatched = shapes_config_cannot_rebuild(model) if hasattr(type(model), "from_pretrained") else []
    if mismatched:
        skipped.append("head_dim")
    if mismatched and (type(model).__name__, mismatched[0]) not in _WARNED:
        _WARNED.add((type(model).__name__, mismatched[0]))  # planning applies to a copy first: say it once
        log.warning(
            "%s: from_pretrained cannot rebuild this pruned model from its config (%d tensors differ, "
            "e.g. %s): no config field describes that shape (BERT and GPT-2 attention, for one, derive "
            "the head size from hidden_size // num_attention_heads; config.pruned_heads is gone in "
            "transformers 5); save with "
            "prunekit.save(model, path, plan=plan) and rebuild with prunekit.load(path, build_dense_model)",
            type(model).__name__,
            len(mismatched),
            mismatched[0],
        )
    if len(skipped) > skipped.count("head_dim"):
        log.warning(
            "layers differ in %s, so the HF config cannot describe them; rebuild with "
            "prunekit.load(path, build_fn), which replays the plan",
            ", ".join(f for f in skipped if f != "head_dim"),
        )
    return skipped
