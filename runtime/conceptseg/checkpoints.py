"""Checkpoints in the published layouts: synthetic writers and the loaders that read them.

``DIR/mllm``: a ConceptSeg-R1 checkpoint as released: HF Qwen2.5-VL ``config.json`` (text fields
at the top level, ``vision_config`` nested, ``num_of_query``), safetensors with the MLLM under the
transformers-4.51 names (``model.*``, ``visual.*``, ``lm_head.*``) *and* the CTM under the reference
names (``learnable_query.*``, ``connector.*``, ``proj_to_sam.*``), tokenizer files, chat template,
``preprocessor_config.json`` and ``generation_config.json``.

``DIR/sam3``: HF ``Sam3Model`` format (``config.json`` + ``model.safetensors``) with the CLIP
tokenizer files and the image processor config.

Loaders never consult a hub: they read these files, split MLLM and CTM weights by key prefix and
take Q and H from tensor shapes. Synthetic weights are random (seeded); masks made with them mean
nothing, which every user-facing output says.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from huggingface_hub import save_torch_state_dict
from safetensors import safe_open

from conceptseg import vocab
from conceptseg.models import qwen as q
from conceptseg.models.ctm import CTM_PREFIXES, ConceptTranslationModule
from conceptseg.models.qwen import quiet_transformers  # lazy: the chosen backend's stack
from conceptseg.sam3_convert import meta_sam3_config  # lazy: the chosen backend's stack
from conceptseg.types import RequestError
from conceptseg.weights import SYNTHETIC_MARKER, safetensors_files


@dataclass(frozen=True)
class MllmSize:
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    mrope_section: tuple[int, int, int]
    tie: bool
    vision_depth: int
    vision_hidden: int
    vision_intermediate: int
    vision_heads: int
    fullatt: tuple[int, ...]
    num_queries: int = 8
    vocab: int = 151936


MLLM_SIZES = {
    # Tiny: the real structure (window + full-attention vision blocks, GQA, M-RoPE), seconds on a CPU.
    "tiny": MllmSize(64, 128, 2, 4, 2, (2, 3, 3), True, 2, 32, 64, 2, (1,)),
    # Qwen2.5-VL-3B-Instruct's architecture (hidden 2048: the CTM's H for the 3B model).
    "real-3b": MllmSize(
        2048, 11008, 36, 16, 2, (16, 24, 24), True, 32, 1280, 3420, 16, (7, 15, 23, 31)
    ),
    # Qwen2.5-VL-7B-Instruct's, as `zhaoyuan666/ConceptSeg-R1-7B` ships it: 28 layers, 28 heads /
    # 4 KV heads, embeddings not tied, vocabulary 152064; the same vision tower (its merger
    # projects to 3584); the CTM at 3584-d with Q = 8 (the paper).
    "real-7b": MllmSize(
        3584, 18944, 28, 28, 4, (16, 24, 24), False, 32, 1280, 3420, 16, (7, 15, 23, 31),
        vocab=152064,
    ),
}


def mllm_config(size: MllmSize) -> dict[str, Any]:
    """``config.json`` of a ConceptSeg-R1 MLLM in the published (transformers 4.51) layout."""
    return {
        "architectures": ["ConceptSegR1ForConditionalGeneration_qwen2p5"],
        "model_type": "qwen2_5_vl",
        "hidden_size": size.hidden,
        "intermediate_size": size.intermediate,
        "num_hidden_layers": size.layers,
        "num_attention_heads": size.heads,
        "num_key_value_heads": size.kv_heads,
        "hidden_act": "silu",
        "max_position_embeddings": 128000,
        "max_window_layers": 70,
        "rms_norm_eps": 1e-6,
        "rope_theta": 1000000.0,
        "rope_scaling": {"type": "mrope", "mrope_section": list(size.mrope_section)},
        "sliding_window": 32768,
        "use_sliding_window": False,
        "tie_word_embeddings": size.tie,
        "vocab_size": size.vocab,
        "torch_dtype": "bfloat16",
        "bos_token_id": q.ENDOFTEXT_ID,
        "eos_token_id": q.IM_END_ID,
        "vision_start_token_id": q.VISION_START_ID,
        "vision_end_token_id": q.VISION_END_ID,
        "vision_token_id": q.VISION_PAD_ID,
        "image_token_id": q.IMAGE_PAD_ID,
        "video_token_id": q.VIDEO_PAD_ID,
        "num_of_query": size.num_queries,
        "vision_config": {
            "model_type": "qwen2_5_vl",
            "depth": size.vision_depth,
            "hidden_size": size.vision_hidden,
            "intermediate_size": size.vision_intermediate,
            "num_heads": size.vision_heads,
            "out_hidden_size": size.hidden,
            "fullatt_block_indexes": list(size.fullatt),
            "hidden_act": "silu",
            "in_chans": 3,
            "patch_size": 14,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
            "tokens_per_second": 2,
            "window_size": 112,
        },
    }


GENERATION_CONFIG = {
    # Qwen2.5-VL-Instruct's shipped generation config; greedy decoding still applies the penalty.
    "bos_token_id": q.ENDOFTEXT_ID,
    "pad_token_id": q.ENDOFTEXT_ID,
    "eos_token_id": [q.IM_END_ID, q.ENDOFTEXT_ID],
    "do_sample": True,
    "repetition_penalty": 1.05,
    "temperature": 0.1,
    "top_p": 0.001,
    "top_k": 1,
}

PREPROCESSOR_CONFIG = {
    "image_processor_type": "Qwen2VLImageProcessor",
    "processor_class": "Qwen2_5_VLProcessor",
    "do_resize": True,
    "do_rescale": True,
    "do_normalize": True,
    "do_convert_rgb": True,
    "rescale_factor": 1 / 255,
    "image_mean": [0.48145466, 0.4578275, 0.40821073],
    "image_std": [0.26862954, 0.26130258, 0.27577711],
    "min_pixels": 3136,
    "max_pixels": 12845056,
    "patch_size": 14,
    "merge_size": 2,
    "temporal_patch_size": 2,
}

# transformers 5 module names -> the names published checkpoints use (4.51 layout).
_TO_PUBLISHED = (("model.language_model.", "model."), ("model.visual.", "visual."))


def _published_name(key: str) -> str:
    for new, old in _TO_PUBLISHED:
        if key.startswith(new):
            return old + key[len(new) :]
    return key


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n")


def write_synthetic_mllm(out: Path, size_name: str, seed: int) -> None:
    """Random-weight ConceptSeg-R1 MLLM + CTM checkpoint in the published layout."""
    from transformers import (  # heavy: transformers, only on this path
        Qwen2_5_VLConfig,
        Qwen2_5_VLForConditionalGeneration,
    )

    size = MLLM_SIZES[size_name]
    config = mllm_config(size)
    torch.manual_seed(seed)
    dtype = torch.float32 if size_name == "tiny" else torch.bfloat16
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # build real sizes directly in bf16: 3B fp32 would need 15 GB
    try:
        model = Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig.from_dict(config))
        ctm = ConceptTranslationModule(size.num_queries, size.hidden)
    finally:
        torch.set_default_dtype(previous)
    nn_init_ctm(ctm, seed)
    state = model.state_dict()
    if size.tie:  # tied output embedding: published checkpoints store it once, as embed_tokens
        state.pop("lm_head.weight")
    tensors = {_published_name(k): v.to(dtype).contiguous() for k, v in state.items()}
    tensors |= {k: v.to(dtype).contiguous() for k, v in ctm.state_dict().items()}
    out.mkdir(parents=True, exist_ok=True)
    save_sharded(tensors, out)
    config["torch_dtype"] = str(dtype).removeprefix("torch.")
    _write_json(out / "config.json", config)
    _write_json(out / "generation_config.json", GENERATION_CONFIG)
    _write_json(out / "preprocessor_config.json", PREPROCESSOR_CONFIG)
    vocab.write_qwen_tokenizer(out)


def nn_init_ctm(ctm: ConceptTranslationModule, seed: int) -> None:
    """Give the CTM non-trivial weights (the reference zero-initialises ``pos_embed``)."""
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, param in ctm.named_parameters():
            if name.endswith("bias"):
                param.normal_(0.0, 0.02, generator=generator)
            elif "norm" in name:
                param.normal_(1.0, 0.02, generator=generator)
            else:
                param.normal_(0.0, param.shape[-1] ** -0.5, generator=generator)


def save_sharded(tensors: dict[str, torch.Tensor], out: Path, max_bytes: int = 4 << 30) -> None:
    """``model.safetensors`` or ``model-0000i-of-0000n.safetensors`` + index, as HF writes them
    (``huggingface_hub.save_torch_state_dict``)."""
    save_torch_state_dict(tensors, out, max_shard_size=max_bytes, metadata={"format": "pt"})


def read_tensors(directory: Path, prefixes: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """Tensors whose names start with one of ``prefixes``, from every shard (no other tensor is read)."""
    out: dict[str, torch.Tensor] = {}
    for path in safetensors_files(directory):
        with safe_open(str(path), framework="pt") as f:
            for key in f.keys():
                if key.startswith(prefixes):
                    out[key] = f.get_tensor(key)
    return out


def load_ctm(directory: Path, dtype: torch.dtype = torch.float32) -> ConceptTranslationModule:
    """The CTM from a ConceptSeg-R1 MLLM checkpoint (keys ``learnable_query.*``, ``connector.*``...)."""
    state = read_tensors(directory, CTM_PREFIXES)
    if "learnable_query.param.weight" not in state:
        raise RequestError(
            "--weights (mllm)",
            f"{directory} has no CTM weights "
            "(learnable_query.param.weight): is it a ConceptSeg-R1 checkpoint?",
        )
    return ConceptTranslationModule.from_state_dict({k: v.float() for k, v in state.items()}).to(
        dtype
    )


def sam3_config(size_name: str) -> Any:
    """HF ``Sam3Config``: the published architecture (``real-3b``, ``real-7b``) or a tiny one of
    the same structure.

    Tiny keeps every part (windowed + global ViT blocks with axial RoPE, FPN, causal CLIP text
    encoder with 32 positions and the real vocabulary, geometry encoder, DETR encoder/decoder with
    presence token, mask decoder with semantic head) and the 256-d prompt width the CTM feeds.
    """
    from transformers import (  # heavy: transformers, only on this path
        CLIPTextConfig,
        Sam3Config,
        Sam3DETRDecoderConfig,
        Sam3DETREncoderConfig,
        Sam3GeometryEncoderConfig,
        Sam3MaskDecoderConfig,
        Sam3VisionConfig,
        Sam3ViTConfig,
    )

    if size_name.startswith("real-"):  # 3B and 7B ConceptSeg-R1 use the same SAM 3
        return meta_sam3_config()  # HF's defaults but the ViT LayerNorm eps Meta trained with
    image, patch, window, d, heads = 112, 14, 4, 256, 2
    grid = image // patch
    backbone = Sam3ViTConfig(
        layer_norm_eps=1e-5,  # Meta's ViT eps (see sam3_convert.meta_sam3_config)
        hidden_size=32,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=2,
        image_size=image,
        patch_size=patch,
        pretrain_image_size=window * patch,
        window_size=window,
        global_attn_indexes=[1, 3],
    )
    vision = Sam3VisionConfig(
        backbone_config=backbone,
        fpn_hidden_size=d,
        scale_factors=[4.0, 2.0, 1.0, 0.5],
        backbone_feature_sizes=[[4 * grid] * 2, [2 * grid] * 2, [grid] * 2],
    )
    text = CLIPTextConfig(
        vocab_size=49408,
        max_position_embeddings=32,
        hidden_size=32,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        projection_dim=32,
        hidden_act="gelu",
        bos_token_id=49406,
        eos_token_id=49407,
    )
    small = {"hidden_size": d, "num_attention_heads": heads, "intermediate_size": 2 * d}
    return Sam3Config(
        vision_config=vision,
        text_config=text,
        geometry_encoder_config=Sam3GeometryEncoderConfig(num_layers=1, roi_size=7, **small),
        detr_encoder_config=Sam3DETREncoderConfig(num_layers=1, **small),
        detr_decoder_config=Sam3DETRDecoderConfig(num_layers=2, num_queries=8, **small),
        mask_decoder_config=Sam3MaskDecoderConfig(
            hidden_size=d, num_upsampling_stages=3, num_attention_heads=heads
        ),
    )


def write_synthetic_sam3(out: Path, size_name: str, seed: int) -> None:
    """Random-weight HF ``Sam3Model`` checkpoint + CLIP tokenizer + image processor config."""
    from transformers import Sam3ImageProcessor, Sam3Model  # heavy: transformers, only on this path


    quiet_transformers()
    config = sam3_config(size_name)
    torch.manual_seed(seed)
    model = Sam3Model(config).eval()
    model.save_pretrained(out)
    side = config.vision_config.backbone_config.image_size
    Sam3ImageProcessor(size={"height": side, "width": side}).save_pretrained(out)
    vocab.write_clip_tokenizer(out)


def synth(out: Path, size_name: str = "tiny", seed: int = 0) -> Path:
    """Write ``out/mllm`` and ``out/sam3`` with random weights; mark the directory as synthetic."""
    if size_name not in MLLM_SIZES:
        raise RequestError("--size", f"{size_name!r} is not one of {sorted(MLLM_SIZES)}")
    out = Path(out)
    write_synthetic_mllm(out / "mllm", size_name, seed)
    write_synthetic_sam3(out / "sam3", size_name, seed)
    _write_json(
        out / SYNTHETIC_MARKER,
        {
            "size": size_name,
            "seed": seed,
            "note": "random weights: masks and answers are meaningless until real checkpoints are given",
        },
    )
    return out
