"""The torch twin of ``qwen.next_token`` for backends whose logits are torch tensors."""

from __future__ import annotations

import torch

from conceptseg.models.qwen import VISION_TOKEN_IDS


def apply_repetition_penalty(
    logits: torch.Tensor, seen: torch.Tensor, penalty: float
) -> torch.Tensor:
    """transformers' rule: logits of already-seen ids are divided (>0) or multiplied (<0)."""
    if penalty == 1.0:
        return logits
    picked = logits.gather(-1, seen)
    picked = torch.where(picked < 0, picked * penalty, picked / penalty)
    return logits.scatter(-1, seen, picked)


def rule_logits(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """(B, V) float32 logits after the penalty over ``seen`` (B, T) and vision suppression."""
    ruled = apply_repetition_penalty(logits.float(), seen, penalty)
    ruled[..., list(VISION_TOKEN_IDS)] = -torch.inf
    return ruled


def next_token(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> int:
    """Greedy choice under the rule (batch of 1)."""
    return int(rule_logits(logits, seen, penalty).argmax(-1))
