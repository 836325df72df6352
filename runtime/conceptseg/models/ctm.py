"""Concept Translation Module: MLLM hidden states -> Q concept tokens for SAM 3 (METHOD.md section 5).

Module names equal the reference checkpoint's keys (``learnable_query.param.weight``,
``connector.pos_embed``, ``connector.blocks.{i}.*``, ``proj_to_sam.{0,2}.*``) so a state dict
loads as is. Unlike the reference, attention takes a key mask: padded keys of a batch are ignored,
so a batched call gives each row what a single call gives.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

CTM_PREFIXES = ("learnable_query.", "connector.", "proj_to_sam.")
SAM_DIM = 256
DEPTH = 4
HEADS = 16


class _Query(nn.Module):
    def __init__(self, q: int, h: int) -> None:
        super().__init__()
        self.param = nn.Embedding(q, h)


class _CrossAttention(nn.Module):
    def __init__(self, h: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.q = nn.Linear(h, h)
        self.kv = nn.Linear(h, 2 * h)
        self.proj = nn.Linear(h, h)

    def forward(
        self, query: torch.Tensor, keys: torch.Tensor, key_mask: torch.Tensor | None
    ) -> torch.Tensor:
        b, q_len, h = query.shape
        k_len = keys.shape[1]
        q = self.q(query).reshape(b, q_len, self.heads, -1).transpose(1, 2)  # (B, heads, Q, hd)
        k, v = self.kv(keys).reshape(b, k_len, 2, self.heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        mask = None if key_mask is None else key_mask[:, None, None, :].bool()  # (B, 1, 1, S)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.proj(out.transpose(1, 2).reshape(b, q_len, h))


class _Mlp(nn.Module):
    def __init__(self, h: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(h, 4 * h)
        self.fc2 = nn.Linear(4 * h, h)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.fc1(x)
        return self.fc2(x * torch.sigmoid(1.702 * x))  # quick_gelu


class _Block(nn.Module):
    def __init__(self, h: int, heads: int) -> None:
        super().__init__()
        self.norm0 = nn.LayerNorm(h, eps=1e-6)
        self.norm1 = nn.LayerNorm(h, eps=1e-6)
        self.norm2 = nn.LayerNorm(h, eps=1e-6)
        self.attn = _CrossAttention(h, heads)
        self.mlp = _Mlp(h)

    def forward(
        self, query: torch.Tensor, keys: torch.Tensor, key_mask: torch.Tensor | None
    ) -> torch.Tensor:
        query = query + self.attn(self.norm0(query), self.norm1(keys), key_mask)
        return query + self.mlp(self.norm2(query))


class _Connector(nn.Module):
    def __init__(self, q: int, h: int, depth: int, heads: int) -> None:
        super().__init__()
        self.pos_embed = nn.Parameter(torch.zeros(1, q, h))
        self.blocks = nn.ModuleList(_Block(h, heads) for _ in range(depth))


class ConceptTranslationModule(nn.Module):
    """``forward(hidden (B, S, H), key_mask (B, S) of 1 = valid) -> concept tokens (B, Q, 256)``."""

    def __init__(
        self, num_queries: int, hidden_size: int, depth: int = DEPTH, heads: int = HEADS
    ) -> None:
        super().__init__()
        assert hidden_size % heads == 0, f"hidden size {hidden_size} not divisible by {heads} heads"
        self.learnable_query = _Query(num_queries, hidden_size)
        self.connector = _Connector(num_queries, hidden_size, depth, heads)
        self.proj_to_sam = nn.Sequential(
            nn.Linear(hidden_size, hidden_size), nn.GELU(), nn.Linear(hidden_size, SAM_DIM)
        )

    @property
    def num_queries(self) -> int:
        return self.learnable_query.param.weight.shape[0]

    def forward(self, hidden: torch.Tensor, key_mask: torch.Tensor | None = None) -> torch.Tensor:
        b = hidden.shape[0]
        query = self.learnable_query.param.weight[None].expand(b, -1, -1) + self.connector.pos_embed
        for block in self.connector.blocks:
            query = block(query, hidden, key_mask)
        return self.proj_to_sam(query)

    @classmethod
    def from_state_dict(cls, state: dict[str, torch.Tensor]) -> ConceptTranslationModule:
        """Build from reference-named keys; Q and H come from ``learnable_query.param.weight``."""
        q, h = state["learnable_query.param.weight"].shape
        depth = len({k.split(".")[2] for k in state if k.startswith("connector.blocks.")})
        ctm = cls(q, h, depth=depth)
        ctm.load_state_dict(state, strict=True)
        return ctm.eval()
