"""A transformers attention implementation whose one-query (decode) steps skip SDPA's CPU kernel.

On CPU, ``scaled_dot_product_attention`` with a single query runs the flash kernel over the whole
cache: 2.6-3.1 ms per layer for Qwen2.5-VL-3B's 16 query / 2 KV heads over 1100 cached positions
(2 threads here), ~100 ms of a 257 ms int4 decode step across 36 layers. The same attention as two
small matmuls per KV head, in float32, takes 0.22 ms and is closer to a float32 reference
(relative L2 1.7e-3 vs flash's 2.4e-3, bf16 inputs). Every other call (prefill, the vision tower)
goes to transformers' SDPA path unchanged, with its masks.

``use(model)`` switches a loaded model's text decoder to it (the name is registered once);
``stock(model)`` switches it back.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

NAME = "conceptseg_decode"


def decode_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers' attention signature: ``query`` (B, H, Q, D), ``key``/``value`` (B, KV, L, D)
    -> ``(B, Q, H, D)``. One query: float32 matmuls per KV head group; otherwise SDPA's path."""
    batch, heads, q_len, dim = query.shape
    others = ("position_bias", "cache", "softcap")  # SDPA's path handles (or refuses) these
    if q_len != 1 or dropout or any(kwargs.get(k) is not None for k in others):
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
            is_causal=is_causal, **kwargs,
        )  # fmt: skip
    kv_heads, length = key.shape[1], key.shape[2]
    scale = dim**-0.5 if scaling is None else scaling
    q = query.reshape(batch, kv_heads, heads // kv_heads, dim).float()
    scores = torch.matmul(q, key.float().transpose(-1, -2)) * scale  # (B, KV, G, L)
    if attention_mask is not None:
        mask = attention_mask[..., :length].expand(batch, heads, 1, length).reshape(scores.shape)
        scores = scores.masked_fill(~mask, -torch.inf) if mask.dtype == torch.bool else scores + mask
    probs = scores.softmax(-1)
    out = torch.matmul(probs, value.float()).to(query.dtype)  # (B, KV, G, D)
    return out.reshape(batch, 1, heads, value.shape[-1]), None


def register() -> None:
    if NAME not in AttentionInterface._global_mapping:
        AttentionInterface.register(NAME, decode_attention)
        AttentionMaskInterface.register(NAME, sdpa_mask)  # the same masks as "sdpa"


def use(model: Any) -> None:
    """Run ``model``'s text decoder (a Qwen2.5-VL ``...ForConditionalGeneration``) on
    :func:`decode_attention`; the vision tower keeps its implementation."""
    register()
    model.set_attn_implementation({"text_config": NAME})


def stock(model: Any) -> None:
    """Put transformers' SDPA back on ``model``'s text decoder (how transformers runs it)."""
    model.set_attn_implementation({"text_config": "sdpa"})
