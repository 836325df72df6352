"""Weight-only int4 / int8 decode layers: quantization error bounds, kernel vs dequantized weight,
the bf16 path for prefill-sized inputs, layers the kernel cannot take.

Run: .venv/bin/pytest tests/unit/test_weight_only.py -q
"""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conceptseg.models import weight_only
from conceptseg.models.weight_only import DecodeLinear, dequantize_int4, quantize_decode


def _linear(n=64, k=96, bias=True, seed=0):
    torch.manual_seed(seed)
    return nn.Linear(k, n, bias=bias).to(torch.bfloat16).requires_grad_(False)


def test_int4_roundtrip_is_within_half_a_step_per_group():
    torch.manual_seed(0)
    w = torch.randn(32, 64) * torch.linspace(0.1, 3, 64)  # groups of different ranges
    q, sz = weight_only.quantize_int4(w, group=32)
    assert q.dtype == torch.int32 and int(q.min()) >= 0 and int(q.max()) <= 15
    assert sz.shape == (2, 32, 2) and sz.dtype == torch.bfloat16
    step = sz[..., 0].t().float().repeat_interleave(32, dim=1)  # (N, K): each weight's scale
    err = (dequantize_int4(q, sz) - w).abs()
    # half a step from rounding, plus bf16 rounding of scale and zero (8 steps from the zero)
    assert bool((err <= 0.5 * step + 16 * 2**-8 * step + 2**-8 * w.abs()).all())


def test_int8_roundtrip_is_within_half_a_step_per_channel():
    torch.manual_seed(0)
    w = torch.randn(16, 40)
    q, scale = weight_only.quantize_int8(w)
    assert q.dtype == torch.int8 and int(q.abs().max()) == 127
    err = (q.float() * scale.float()[:, None] - w).abs()
    assert bool((err <= 0.51 * scale.float()[:, None] + 2**-8 * w.abs()).all())


@pytest.mark.parametrize("mode", weight_only.MODES)
@pytest.mark.parametrize("rows", [1, 3, 16])
def test_decode_rows_use_the_low_bit_copy(mode, rows):
    layer = _linear()
    x = torch.randn(1, rows, 96, dtype=torch.bfloat16)
    dec = DecodeLinear(layer, mode)
    if mode == "int4":
        w = dequantize_int4(*weight_only.quantize_int4(layer.weight))
    else:
        q, scale = weight_only.quantize_int8(layer.weight)
        w = q.float() * scale.float()[:, None]
    want = F.linear(x.float(), w, layer.bias.float())
    got = dec(x)
    assert got.shape == (1, rows, 64) and got.dtype == torch.bfloat16
    rel = float((got.float() - want).norm() / want.norm())
    assert rel < 1e-2, f"{mode} kernel vs its dequantized weight: relative L2 {rel:.2e}"
    # and it is not the bf16 weight's result (the copy is what ran)
    exact = F.linear(x, layer.weight, layer.bias).float()
    assert float((got.float() - exact).norm() / exact.norm()) > 1e-3


@pytest.mark.parametrize("mode", weight_only.MODES)
def test_prefill_rows_use_the_bf16_weight_exactly(mode):
    layer = _linear(bias=False)
    x = torch.randn(2, 9, 96, dtype=torch.bfloat16)  # 18 rows > MAX_ROWS
    assert 18 > weight_only.MAX_ROWS
    torch.testing.assert_close(DecodeLinear(layer, mode)(x), F.linear(x, layer.weight), rtol=0, atol=0)


def test_swap_keeps_what_the_kernel_cannot_take_and_shares_weights():
    model = nn.Sequential(
        nn.Linear(64, 48), nn.ReLU(), nn.Sequential(nn.Linear(48, 40), nn.Linear(40, 64))
    ).to(torch.bfloat16)
    weight = model[0].weight
    kept = quantize_decode(model, "int4")
    # 48 -> 40: 40 output channels is not a multiple of 16; 40 -> 64: 40 inputs is not a multiple of 32
    assert kept == ["2.0", "2.1"]
    assert isinstance(model[0], DecodeLinear) and model[0].weight is weight
    assert isinstance(model[2][0], nn.Linear) and not isinstance(model[2][0], DecodeLinear)
    out = model(torch.randn(1, 64, dtype=torch.bfloat16))
    assert out.shape == (1, 64)


def test_swap_refuses_float32_layers():
    with pytest.raises(AssertionError, match="not bf16"):
        quantize_decode(nn.Sequential(nn.Linear(64, 64)), "int8")
