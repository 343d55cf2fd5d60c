"""Keep a pruned Hugging Face model's `config` true, so `save_pretrained` / `from_pretrained` work.

transformers builds every layer from one config, so a field can follow the pruned model only
when all layers agree (uniform `scope="layer"` pruning gives that). When they do not, the
field is left alone and `prunekit.load` (which replays the plan) is the way to rebuild.
"""

from __future__ import annotations

import logging
from typing import Any

from torch import nn

log = logging.getLogger(__name__)

# (config field, how to read it from one module); a module answers None when it does not apply.
_FFN_CHILDREN = ("gate_proj", "up_proj", "fc1")


def _ffn_width(fqn: str, module: Any) -> int | None:
    if fqn.endswith("intermediate.dense") and isinstance(module, nn.Linear):
        return module.out_features
    if fqn.endswith("mlp") and any(isinstance(getattr(module, c, None), nn.Linear) for c in _FFN_CHILDREN):
        child = next(getattr(module, c) for c in _FFN_CHILDREN if isinstance(getattr(module, c, None), nn.Linear))
        return child.out_features
    if fqn.endswith("mlp") and hasattr(getattr(module, "c_fc", None), "nf"):
        return module.c_fc.nf
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
    return None


def update_config(model: nn.Module) -> list[str]:
    """Set the HF config's size fields from the (pruned) modules, where uniform (mutates).

    Returns:
        Names of fields that could not be set because layers differ (empty when all fit).
    """
    config: Any = getattr(model, "config", None)
    if config is None or not hasattr(config, "to_dict"):
        return []
    ffn = {w for fqn, m in model.named_modules() if (w := _ffn_width(fqn, m)) is not None}
    heads = {h for m in model.modules() if (h := _heads(m)) is not None}
    skipped = []
    ffn_field = "n_inner" if hasattr(config, "n_inner") else "intermediate_size"
    if len(ffn) == 1:
        setattr(config, ffn_field, ffn.pop())
    elif ffn:
        skipped.append(ffn_field)
    if len(heads) == 1:
        q, kv, hd = heads.pop()
        if q != config.num_attention_heads:
            config.num_attention_heads = q
            # Configs derive head_dim from hidden_size / heads unless it is stored explicitly.
            config.head_dim = hd
        if kv is not None and hasattr(config, "num_key_value_heads"):
            config.num_key_value_heads = kv
    elif heads:
        skipped.append("num_attention_heads")
    if skipped:
        log.warning(
            "layers differ in %s, so the HF config cannot describe them; rebuild with "
            "prunekit.load(path, build_fn), which replays the plan",
            ", ".join(skipped),
        )
    return skipped
