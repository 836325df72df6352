"""Weight-only int4 / int8 copies of a torch decoder's linear layers, for its decode steps on CPU.

Decoding is memory-bound: every step reads every weight once, and the bf16 copy is 6.2 GB a token
at 3B. A decode step has one row per sequence, so :class:`DecodeLinear` multiplies those few rows
with a packed low-bit copy of the weight (torch's CPU kernels ``_weight_int4pack_mm_for_cpu`` and
``_weight_int8pack_mm``, bf16 activations) and keeps the bf16 weight for the prefill, where the
work is compute-bound and bf16 GEMMs run on AMX tiles or AVX-512 BF16 (at 1144 rows x 2048 x
11008, 2 threads here: bf16 147 ms, the int4 kernel 397 ms; at one row int4 0.8 ms, bf16 7.1 ms).

- ``int4``: asymmetric round-to-nearest per group of ``group`` input channels, in the layout of
  torch's int4 kernel: ``w ~ (q - 8) * scale + zero`` with ``q`` in 0..15 and ``(scale, zero)``
  in bf16 per group and output channel (torchao's ``int4_weight_only`` uses the same kernel).
- ``int8``: symmetric per output channel, ``w ~ q * scale`` with ``q`` in -127..127.

Both copies stay resident (int4 adds ~31 % of the bf16 bytes: nibbles + a bf16 scale and zero
per 32 weights; int8 ~50 %).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

MODES = ("int4", "int8")
GROUP = 32  # int4 group size along the input channels (the ort-genai export's block size too)
MAX_ROWS = 16  # at most this many rows go through the low-bit copy; more (prefill) use bf16
INT4_N_MULTIPLE = 16  # torch's CPU int4 packing needs the output channels in multiples of 16


def quantize_int4(weight: torch.Tensor, group: int = GROUP) -> tuple[torch.Tensor, torch.Tensor]:
    """``(N, K)`` weight -> ``(q, scales_and_zeros)``: ``q`` (N, K) int32 in 0..15 and
    ``scales_and_zeros`` (K / group, N, 2) bf16, the layout ``_weight_int4pack_mm_for_cpu`` takes."""
    n, k = weight.shape
    assert k % group == 0, f"input channels {k} are not a multiple of the group {group}"
    w = weight.float().reshape(n, k // group, group)
    low, high = w.amin(-1, keepdim=True), w.amax(-1, keepdim=True)
    # scale and zero as the kernel will read them (bf16), then each weight rounded against those
    scale = ((high - low) / 15).clamp(min=1e-6).to(torch.bfloat16).float()
    zero = (low + 8 * scale).to(torch.bfloat16).float()
    q = ((w - zero) / scale + 8).round().clamp(0, 15)
    scales_and_zeros = torch.stack([scale[..., 0].t(), zero[..., 0].t()], dim=-1)
    return q.to(torch.int32).reshape(n, k), scales_and_zeros.to(torch.bfloat16).contiguous()


def dequantize_int4(q: torch.Tensor, scales_and_zeros: torch.Tensor, group: int = GROUP) -> torch.Tensor:
    """The float32 weight that ``(q, scales_and_zeros)`` stand for (for tests and error figures)."""
    n, k = q.shape
    scale = scales_and_zeros[..., 0].t().float().reshape(n, k // group, 1)
    zero = scales_and_zeros[..., 1].t().float().reshape(n, k // group, 1)
    return ((q.float().reshape(n, k // group, group) - 8) * scale + zero).reshape(n, k)


def quantize_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(N, K)`` weight -> ``(q, scales)``: ``q`` (N, K) int8, ``scales`` (N,) bf16."""
    w = weight.float()
    scale = (w.abs().amax(-1) / 127).clamp(min=1e-8)
    q = (w / scale[:, None]).round().clamp(-127, 127).to(torch.int8)
    return q, scale.to(torch.bfloat16)


def supports(linear: nn.Linear, mode: str, group: int = GROUP) -> bool:
    """Whether torch's kernel for ``mode`` takes this layer's shape."""
    n, k = linear.weight.shape
    if mode == "int4":
        return n % INT4_N_MULTIPLE == 0 and k % group == 0
    return True


class DecodeLinear(nn.Module):
    """An ``nn.Linear`` (bf16) that multiplies inputs of at most ``max_rows`` rows with a packed
    ``mode`` copy of its weight and larger inputs with the bf16 weight itself."""

    def __init__(self, linear: nn.Linear, mode: str, group: int = GROUP, max_rows: int = MAX_ROWS) -> None:
        super().__init__()
        assert mode in MODES, f"mode {mode!r} is not one of {MODES}"
        assert supports(linear, mode, group), f"{mode} does not take a {tuple(linear.weight.shape)} weight"
        self.weight, self.bias = linear.weight, linear.bias  # shared: a tied LM head stays tied
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.mode, self.group, self.max_rows = mode, group, max_rows
        with torch.no_grad():
            if mode == "int4":
                q, scales = quantize_int4(linear.weight, group)
                packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)
            else:
                packed, scales = quantize_int8(linear.weight)
        self.register_buffer("packed", packed, persistent=False)
        self.register_buffer("scales", scales, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // self.in_features
        if rows > self.max_rows:
            return F.linear(x, self.weight, self.bias)
        flat = x.reshape(rows, self.in_features).to(torch.bfloat16)
        if self.mode == "int4":
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(flat, self.packed, self.group, self.scales)
        else:
            y = torch.ops.aten._weight_int8pack_mm(flat, self.packed, self.scales)
        if self.bias is not None:
            y = y + self.bias
        return y.to(x.dtype).reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"{self.in_features} -> {self.out_features}, {self.mode}, rows <= {self.max_rows}"


def quantize_decode(root: nn.Module, mode: str) -> list[str]:
    """Swap every ``nn.Linear`` under ``root`` for a :class:`DecodeLinear` where the kernel takes
    its shape; returns the names of those it kept as they were. The layers' parameters must be
    bf16 (load the model with ``dtype=torch.bfloat16``)."""
    kept = []
    for prefix, parent in list(root.named_modules()):
        for name, child in list(parent.named_children()):
            if not isinstance(child, nn.Linear):
                continue
            if not supports(child, mode):
                kept.append(f"{prefix}.{name}" if prefix else name)
                continue
            assert child.weight.dtype == torch.bfloat16, f"{prefix}.{name} is {child.weight.dtype}, not bf16"
            setattr(parent, name, DecodeLinear(child, mode))
    return kept
