"""A GPU performance model on paper (a MODEL, not a measurement): per step of one reasoning
request, FLOPs and bytes from the model configs (``conceptseg synth``'s real-3b / real-7b
definitions; no weights are read or allocated), and the latency they imply on a chip:

    t(step) = max(FLOPs / (peak_flops * compute_efficiency), bytes / (bandwidth * memory_efficiency))

Peaks are the vendors' dense fp16/bf16 tensor figures (sources in benchmarks/README.md);
the efficiencies are stated assumptions, checked against the published SAM 3 anchors in the
same table. Counting rules: a multiply-add is 2 FLOPs; linear layers 2 * tokens * in * out;
attention 4 * tokens * keys * width (QK^T and AV; causal prefill counts half the keys);
weights in fp16/bf16 (2 bytes) unless a row says int4/fp8; decode reads every decoder weight
and the KV cache once per token. Norms, activations, the SAM 3 FPN neck and the mask
decoder's upsampling are left out (a few % of the totals).

    .venv/bin/python benchmarks/perf_model.py                 # markdown tables to stdout
    .venv/bin/python benchmarks/perf_model.py --json          # the same numbers as JSON
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from typing import Any

from conceptseg.checkpoints import MLLM_SIZES, MllmSize, sam3_config

# The bundled sample request (benchmarks/README.md): mosaic + target at 588 px, 1144 prompt tokens
IMAGES, PATCHES_PER_IMAGE, PROMPT_TOKENS, NEW_TOKENS = 2, 42 * 42, 1144, 200


@dataclass(frozen=True)
class Chip:
    name: str
    tflops: float  # dense fp16/bf16 tensor-core peak
    tbps: float  # memory bandwidth, TB/s


CHIPS = (
    Chip("H100 SXM", 989.0, 3.35),
    Chip("H200 SXM", 989.0, 4.8),
    Chip("L4", 121.0, 0.30),
    Chip("Jetson AGX Orin 64GB", 42.5, 0.2048),
    Chip("RTX 3090", 71.0, 0.936),
)
# Compute efficiency: the fraction of the dense peak SAM 3 reaches in its own paper (30 ms per
# image on an H200; `anchors()` derives it, ~0.19); memory efficiency: an assumption for
# TensorRT-LLM decode at batch 1 (no published Qwen2.5-VL batch-1 figure found to derive it from)
COMPUTE_EFFICIENCY = 0.19
MEMORY_EFFICIENCY = 0.75
# Published anchors: (what, measured ms, chip, the SAM 3 steps it covers)
ANCHORS = (
    ("SAM 3 paper: one image, H200", 30.0, Chip("H200 SXM", 989.0, 4.8),
     ("sam3_vision", "sam3_text", "sam3_heads")),
    ("TensorRT FP16 SAM 3 vision encoder, GH200 (METHOD.md 7)", 72.0, Chip("GH200", 989.0, 4.0),
     ("sam3_vision",)),
    ("community TensorRT SAM 3 end to end, RTX 3090 (issue #14)", 75.0,
     Chip("RTX 3090 (fp16 accumulate)", 142.0, 0.936), ("sam3_vision", "sam3_text", "sam3_heads")),
)  # fmt: skip


def linear(tokens: int, fan_in: int, fan_out: int) -> float:
    return 2.0 * tokens * fan_in * fan_out


def attention(tokens: int, keys: int, width: int) -> float:
    return 4.0 * tokens * keys * width


def sam3_steps() -> dict[str, dict[str, float]]:
    """FLOPs and weight bytes of SAM 3's vision encoder, text encoder and heads (40-slot prompt)."""
    cfg = sam3_config("real-3b")
    vit = cfg.vision_config.backbone_config
    d, mlp, side = vit.hidden_size, vit.intermediate_size, vit.image_size // vit.patch_size
    tokens, window = side * side, vit.window_size**2
    per_block = linear(tokens, d, 3 * d) + linear(tokens, d, d) + 2 * linear(tokens, d, mlp)
    attn = sum(attention(tokens, tokens if i in vit.global_attn_indexes else window, d)
               for i in range(vit.num_hidden_layers))  # fmt: skip
    vision = vit.num_hidden_layers * per_block + attn + linear(tokens, 3 * vit.patch_size**2, d)
    vit_params = vit.num_hidden_layers * (4 * d * d + 2 * d * mlp)
    text = cfg.text_config
    t_params = text.num_hidden_layers * (4 * text.hidden_size**2 + 2 * text.hidden_size * text.intermediate_size)
    text_flops = 2.0 * 32 * t_params + text.num_hidden_layers * attention(32, 32, text.hidden_size)
    enc, dec = cfg.detr_encoder_config, cfg.detr_decoder_config
    h, ff, prompt = enc.hidden_size, enc.intermediate_size, 40
    enc_layer = (linear(tokens, h, 4 * h) + attention(tokens, tokens, h)  # self-attention
                 + linear(tokens, h, 2 * h) + attention(tokens, prompt, h)  # to the prompt
                 + 2 * linear(tokens, h, ff))  # fmt: skip
    q = dec.num_queries + 1
    dec_layer = (linear(q, h, 4 * h) + attention(q, q, h) + linear(q, h, 2 * h)
                 + attention(q, tokens, h) + 2 * linear(tokens, h, h) + 2 * linear(q, h, ff))  # fmt: skip
    mask = linear(288 * 288, h, h) * 2 + 2.0 * (dec.num_queries + 1) * 288 * 288 * h
    heads = enc.num_layers * enc_layer + dec.num_layers * dec_layer + mask
    head_params = enc.num_layers * (8 * h * h + 2 * h * ff) + dec.num_layers * (8 * h * h + 2 * h * ff)
    return {
        "sam3_vision": {"flops": vision, "bytes": 2.0 * vit_params},
        "sam3_text": {"flops": text_flops, "bytes": 2.0 * t_params},
        "sam3_heads": {"flops": heads, "bytes": 2.0 * head_params},
    }


def qwen_vision(size: MllmSize) -> tuple[float, float]:
    """FLOPs and weight bytes of the vision tower + merger over both images."""
    d, mlp, n = size.vision_hidden, size.vision_intermediate, IMAGES * PATCHES_PER_IMAGE
    per_block = linear(n, d, 3 * d) + linear(n, d, d) + 3 * linear(n, d, mlp)  # SwiGLU MLP
    window = (112 // 14) ** 2
    attn = sum(attention(n, PATCHES_PER_IMAGE if i in size.fullatt else window, d)
               for i in range(size.vision_depth))  # fmt: skip
    merged = n // 4
    merger = linear(merged, 4 * d, 4 * d) + linear(merged, 4 * d, size.hidden)
    params = size.vision_depth * (4 * d * d + 3 * d * mlp) + 16 * d * d + 4 * d * size.hidden
    return size.vision_depth * per_block + attn + merger, 2.0 * params


def decoder_params(size: MllmSize) -> int:
    head_dim = size.hidden // size.heads
    attn = size.hidden * (size.heads + 2 * size.kv_heads) * head_dim + size.heads * head_dim * size.hidden
    return size.layers * (attn + 3 * size.hidden * size.intermediate)


def kv_bytes(size: MllmSize, context: int, element: int = 2) -> float:
    return 2.0 * size.layers * size.kv_heads * (size.hidden // size.heads) * context * element


def mllm_steps(size: MllmSize) -> dict[str, dict[str, float]]:
    """Vision tower, text prefill, one decode step (bf16 and int4 weights), the CTM, and the
    reference's full re-forward (vision again, every token, LM head at every position)."""
    vision, vision_bytes = qwen_vision(size)
    body, head = decoder_params(size), size.vocab * size.hidden
    total = PROMPT_TOKENS + NEW_TOKENS

    def prefill(tokens: int, head_rows: int) -> float:
        return 2.0 * tokens * body + size.layers * 2.0 * tokens * tokens * size.hidden + 2.0 * head_rows * head

    context = PROMPT_TOKENS + NEW_TOKENS // 2
    step_bytes = 2.0 * (body + head) + kv_bytes(size, context)
    int4_bytes = (body + head) * 5 / 8 + kv_bytes(size, context)  # 4-bit + scale per 32
    ctm = 4 * (linear(NEW_TOKENS, size.hidden, 2 * size.hidden) + 14 * size.hidden**2 * 8)
    ctm_params = 4 * 12 * size.hidden**2 + size.hidden**2 + 256 * size.hidden
    return {
        "mllm_vision": {"flops": vision, "bytes": vision_bytes},
        "mllm_prefill": {"flops": prefill(PROMPT_TOKENS, 1), "bytes": 2.0 * (body + head)},
        "mllm_decode_token_bf16": {"flops": 2.0 * (body + head), "bytes": step_bytes},
        "mllm_decode_token_int4": {"flops": 2.0 * (body + head), "bytes": int4_bytes},
        "ctm": {"flops": ctm, "bytes": 2.0 * ctm_params},
        "reference_full_forward": {"flops": vision + prefill(total, total),
                                   "bytes": vision_bytes + 2.0 * (body + head)},  # fmt: skip
    }


def latency_ms(step: dict[str, float], chip: Chip) -> float:
    compute = step["flops"] / (chip.tflops * 1e12 * COMPUTE_EFFICIENCY)
    memory = step["bytes"] / (chip.tbps * 1e12 * MEMORY_EFFICIENCY)
    return 1e3 * max(compute, memory)


def request_ms(steps: dict[str, dict[str, float]], chip: Chip, reference: bool) -> float:
    """One reasoning request, ~200 new tokens: ours (image once, states captured while
    decoding) or the reference recipe (image twice, a probe, a full re-forward)."""
    t = {name: latency_ms(step, chip) for name, step in steps.items()}
    ours = (t["sam3_vision"] + t["sam3_text"] + t["sam3_heads"] + t["mllm_vision"]
            + t["mllm_prefill"] + NEW_TOKENS * t["mllm_decode_token_bf16"] + t["ctm"])  # fmt: skip
    if not reference:
        return ours
    return ours + t["sam3_vision"] + t["sam3_text"] + t["sam3_heads"] + t["reference_full_forward"]


def anchors() -> list[dict[str, Any]]:
    """Each anchor's implied compute efficiency: modelled FLOPs / (measured time * peak)."""
    sam3 = sam3_steps()
    out = []
    for what, ms, chip, steps in ANCHORS:
        flops = sum(sam3[s]["flops"] for s in steps)
        out.append({"anchor": what, "measured_ms": ms, "chip": chip.name, "gflop": flops / 1e9,
                    "implied_compute_efficiency": flops / (ms / 1e3 * chip.tflops * 1e12),
                    "modelled_ms": sum(latency_ms(sam3[s], chip) for s in steps)})  # fmt: skip
    return out


def model(sizes: tuple[str, ...] = ("real-3b", "real-7b")) -> dict[str, Any]:
    sam3 = sam3_steps()
    out: dict[str, Any] = {"assumptions": {"compute_efficiency": COMPUTE_EFFICIENCY,
                                           "memory_efficiency": MEMORY_EFFICIENCY,
                                           "prompt_tokens": PROMPT_TOKENS, "new_tokens": NEW_TOKENS},
                           "chips": [c.__dict__ for c in CHIPS], "anchors": anchors(),
                           "sizes": {}}  # fmt: skip
    for name in sizes:
        steps = sam3 | mllm_steps(MLLM_SIZES[name])
        out["sizes"][name] = {
            "steps": {k: v | {c.name: latency_ms(v, c) for c in CHIPS} for k, v in steps.items()},
            "request_ms": {c.name: {"ours": request_ms(steps, c, False),
                                    "reference_recipe": request_ms(steps, c, True)}
                           for c in CHIPS},  # fmt: skip
        }
    return out


def markdown(result: dict[str, Any]) -> str:
    names = [c.name for c in CHIPS]
    lines = []
    for size, data in result["sizes"].items():
        lines += [f"**{size}** (modelled ms; GFLOP and MB per step)", "",
                  "| step | GFLOP | MB moved | " + " | ".join(names) + " |",
                  "| --- | ---: | ---: | " + " | ".join("---:" for _ in names) + " |"]  # fmt: skip
        for step, v in data["steps"].items():
            cells = " | ".join(f"{v[n]:.3g}" for n in names)
            lines.append(f"| {step} | {v['flops'] / 1e9:.4g} | {v['bytes'] / 1e6:.4g} | {cells} |")
        for who in ("ours", "reference_recipe"):
            cells = " | ".join(f"{data['request_ms'][n][who]:.4g}" for n in names)
            lines.append(f"| **request, {who}** ({NEW_TOKENS} tokens) | | | {cells} |")
        lines.append("")
    lines += ["| published anchor | measured | modelled | GFLOP | implied efficiency |",
              "| --- | ---: | ---: | ---: | ---: |"]  # fmt: skip
    for a in result["anchors"]:
        lines.append(f"| {a['anchor']} | {a['measured_ms']:.0f} ms | {a['modelled_ms']:.0f} ms | "
                     f"{a['gflop']:.0f} | {a['implied_compute_efficiency']:.2f} |")  # fmt: skip
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print the numbers as JSON")
    args = parser.parse_args()
    result = model()
    print(json.dumps(result, indent=1) if args.json else markdown(result))


if __name__ == "__main__":
    main()
