"""Head pruning for `nn.MultiheadAttention`, which cannot express it on its own.

`nn.MultiheadAttention` derives `head_dim = embed_dim // num_heads` and insists that the
q/k/v width equals the input width, so with fewer heads it would split the remaining width
into wrong-sized heads. After head removal the module's class is switched to
`PrunedMultiheadAttention`, whose forward reads `num_heads` and `head_dim` explicitly; its
state_dict keys are unchanged, so saved weights and replayed plans load as before.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from prunekit.errors import UnsupportedLayerError
from prunekit.structured.layers import register_layer_handler


class PrunedMultiheadAttention(nn.MultiheadAttention):
    """`nn.MultiheadAttention` with `num_heads * head_dim` != `embed_dim` (after head pruning).

    Supports packed q/k/v projections, `batch_first` either way, `key_padding_mask`,
    `attn_mask` (bool or additive), `is_causal` and `need_weights`.
    """

    head_dim: int

    def forward(  # type: ignore[override]
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        key_padding_mask: Tensor | None = None,
        need_weights: bool = True,
        attn_mask: Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[Tensor, Tensor | None]:
        if not self.batch_first:
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))
        w_q, w_k, w_v = self.in_proj_weight.chunk(3)
        b_q, b_k, b_v = self.in_proj_bias.chunk(3) if self.in_proj_bias is not None else (None, None, None)
        triples = ((query, w_q, b_q), (key, w_k, b_k), (value, w_v, b_v))
        q, k, v = (self._heads(F.linear(t, w, b)) for t, w, b in triples)
        mask = _merge_masks(attn_mask, key_padding_mask, q.dtype)
        dropout = self.dropout if self.training else 0.0
        if need_weights:
            scores = q @ k.transpose(-2, -1) / self.head_dim**0.5
            if mask is not None:
                scores = scores + mask
            elif is_causal:
                causal = torch.ones(scores.shape[-2:], dtype=torch.bool, device=scores.device).tril()
                scores = scores.masked_fill(~causal, float("-inf"))
            weights = F.dropout(scores.softmax(dim=-1), dropout, self.training)
            out = weights @ v
        else:
            weights = None
            out = F.scaled_dot_product_attention(q, k, v, mask, dropout, is_causal and mask is None)
        out = self.out_proj(out.transpose(1, 2).flatten(2))
        if not self.batch_first:
            out = out.transpose(0, 1)
        if weights is not None and average_attn_weights:
            weights = weights.mean(dim=1)
        return out, weights

    def _heads(self, x: Tensor) -> Tensor:
        return x.unflatten(-1, (self.num_heads, self.head_dim)).transpose(1, 2)


def _merge_masks(attn_mask: Tensor | None, key_padding_mask: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    """One additive float mask (-inf where attention is not allowed), broadcastable to scores."""
    out = None
    for mask, shape in ((attn_mask, None), (key_padding_mask, "kpm")):
        if mask is None:
            continue
        if mask.dtype == torch.bool:
            mask = torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(mask, float("-inf"))
        mask = mask.to(dtype)
        if shape == "kpm":
            mask = mask[:, None, None, :]
        out = mask if out is None else out + mask
    return out


def _mha_dims(module: nn.MultiheadAttention) -> dict[str, tuple[int, ...]]:
    return {"in_proj_weight": (0,), "in_proj_bias": (0,)} if module._qkv_same_embed_dim else {}


@register_layer_handler(nn.MultiheadAttention, shrinkable=_mha_dims, outputs=lambda m: {"in_proj_weight": 0})
def _update_mha(module: nn.MultiheadAttention) -> None:
    if module.bias_k is not None or module.add_zero_attn:
        raise UnsupportedLayerError("nn.MultiheadAttention with add_bias_kv/add_zero_attn cannot drop heads")
    head_dim = getattr(module, "head_dim", module.embed_dim // module.num_heads)
    width = module.in_proj_weight.shape[0] // 3
    module.head_dim = head_dim
    module.num_heads = width // head_dim
    module.__class__ = PrunedMultiheadAttention
