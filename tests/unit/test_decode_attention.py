"""The one-query attention against transformers' SDPA path: GQA groups, boolean and additive
masks, and the calls it hands to SDPA unchanged.

Run: .venv/bin/pytest tests/unit/test_decode_attention.py -q
"""

import pytest
import torch
from torch import nn
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from conceptseg.models.decode_attention import decode_attention


class _Layer(nn.Module):
    num_key_value_groups = 4
    is_causal = True


def _qkv(q_len, dtype=torch.float32, length=37):
    torch.manual_seed(0)
    q = torch.randn(2, 8, q_len, 16, dtype=dtype)
    k, v = (torch.randn(2, 2, length, 16, dtype=dtype) for _ in range(2))
    return q, k, v


@pytest.mark.parametrize("mask_kind", [None, "bool", "float"])
def test_one_query_matches_sdpa(mask_kind):
    q, k, v = _qkv(1)
    mask = None
    if mask_kind:
        keep = torch.rand(2, 1, 1, 37) > 0.3
        keep[..., -1] = True  # every row keeps its own position
        mask = keep if mask_kind == "bool" else torch.zeros(keep.shape).masked_fill(~keep, -1e9)
    want, _ = sdpa_attention_forward(_Layer(), q, k, v, mask, scaling=0.25)
    got, _ = decode_attention(_Layer(), q, k, v, mask, scaling=0.25)
    assert got.shape == want.shape == (2, 1, 8, 16)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


def test_bf16_one_query_is_within_bf16_rounding_of_float32():
    q, k, v = _qkv(1, torch.bfloat16, length=1100)
    exact, _ = sdpa_attention_forward(_Layer(), q.float(), k.float(), v.float(), None)
    got, _ = decode_attention(_Layer(), q, k, v, None)
    assert got.dtype == torch.bfloat16
    assert float((got.float() - exact).norm() / exact.norm()) < 4e-3  # bf16 output rounding


def test_prefill_goes_to_sdpa_unchanged():
    q, k, v = _qkv(5, length=5)
    want, _ = sdpa_attention_forward(_Layer(), q, k, v, None)
    got, _ = decode_attention(_Layer(), q, k, v, None)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
