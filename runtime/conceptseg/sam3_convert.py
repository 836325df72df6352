"""Meta's SAM 3 checkpoint (``sam3.pt``, package ``sam3``) -> transformers' ``Sam3Model`` layout.

Contract: :func:`meta_to_hf` renames the detector keys (``detector.*``; ``tracker.*`` and any
other prefix is ignored), splits Meta's fused attention projections into ``q/k/v_proj``, drops
the class-token slot of the ViT's absolute position table, transposes the CLIP
``text_projection`` and leaves out tensors HF does not store (RoPE tables, which HF recomputes;
point-prompt projections, which HF's image model has no input for; the tracker's SAM 2 neck).
A detector key no rule covers raises ``ValueError``: an unknown layout fails loudly instead of
converting partially. The result covers all 1468 keys of the default ``Sam3Config``, which
:func:`check_complete` verifies without allocating a model.

:func:`convert_checkpoint` writes an HF-format directory that ``TorchSam3`` loads offline:
``config.json`` (:func:`meta_sam3_config`: the default ``Sam3Config`` with the ViT's LayerNorm
eps set to Meta's value), ``model.safetensors``, the CLIP tokenizer files and the image
processor config. The key rules follow transformers' ``convert_sam3_to_hf.py``.
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from conceptseg import vocab

META_PREFIX = "detector."
# Meta's ViT LayerNorms use eps 1e-5 (sam3/model/vitdet.py); HF's Sam3ViTConfig defaults to 1e-6.
META_VIT_LAYER_NORM_EPS = 1e-5

# Meta keys (after the prefix) with no counterpart in HF's image model.
DROPPED = (
    r"backbone\.vision_backbone\.trunk\.blocks\.\d+\.attn\.freqs_cis",  # RoPE table
    r"backbone\.vision_backbone\.sam2_convs\..+",  # the video tracker's SAM 2 neck
    r"geometry_encoder\.points_(direct|pool|pos_enc)_project\..+",  # point prompts
)

Target = str | Callable[[re.Match[str]], str]


def _mlp(meta: str, hf: str) -> tuple[str, Target]:
    """Meta ``MLP.layers.{i}`` -> HF ``layer{i+1}`` (HF numbers its head MLP layers from 1)."""
    return rf"{meta}\.layers\.(\d+)\.(weight|bias)", lambda m: f"{hf}.layer{int(m[1]) + 1}.{m[2]}"


def _scope(meta: str, hf: str, *rules: tuple[str, str]) -> tuple[tuple[str, Target], ...]:
    """Rules under one module: ``meta``/``hf`` prefixes joined to each (pattern, template)."""
    return tuple((rf"{meta}\.{p}", rf"{hf}.{t}") for p, t in rules)


def _attention(index: str, meta: str, hf: str) -> tuple[tuple[str, str], ...]:
    """``nn.MultiheadAttention`` names -> HF ``o_proj`` + fused ``in_proj_`` (split later)."""
    return (
        (rf"{meta}\.out_proj\.(.+)", rf"{hf}.o_proj.{index}"),
        (rf"{meta}\.in_proj_(.+)", rf"{hf}.in_proj_{index}"),
    )


# (full-match pattern on the Meta key, HF key template or builder); the first match wins.
# Fused projections keep a ``.qkv.`` / ``.in_proj_`` marker that _convert_tensor splits.
RULES: tuple[tuple[str, Target], ...] = (
    # Vision: ViT trunk
    *_scope(
        r"backbone\.vision_backbone\.trunk",
        "vision_encoder.backbone",
        (r"pos_embed", "embeddings.position_embeddings"),
        (r"patch_embed\.proj\.(.+)", r"embeddings.patch_embeddings.projection.\1"),
        (r"ln_pre\.(.+)", r"layer_norm.\1"),
        (r"blocks\.(\d+)\.norm([12])\.(.+)", r"layers.\1.layer_norm\2.\3"),
        (r"blocks\.(\d+)\.attn\.qkv\.(.+)", r"layers.\1.attention.qkv.\2"),
        (r"blocks\.(\d+)\.attn\.proj\.(.+)", r"layers.\1.attention.o_proj.\2"),
        (r"blocks\.(\d+)\.mlp\.(fc[12])\.(.+)", r"layers.\1.mlp.\2.\3"),
    ),
    # Vision: FPN neck (HF's scale_layers.1 is the GELU between the two deconvolutions)
    *_scope(
        r"backbone\.vision_backbone\.convs\.(\d+)",
        r"vision_encoder.neck.fpn_layers.\1",
        (r"dconv_2x2(_0)?\.(.+)", r"scale_layers.0.\3"),
        (r"dconv_2x2_1\.(.+)", r"scale_layers.2.\2"),
        (r"conv_1x1\.(.+)", r"proj1.\2"),
        (r"conv_3x3\.(.+)", r"proj2.\2"),
    ),
    # Text: causal CLIP, then the 1024 -> 256 resizer
    *_scope(
        r"backbone\.language_backbone\.encoder",
        "text_encoder",
        (r"token_embedding\.(.+)", r"text_model.embeddings.token_embedding.\1"),
        (r"positional_embedding", "text_model.embeddings.position_embedding.weight"),
        (r"ln_final\.(.+)", r"text_model.final_layer_norm.\1"),
        (r"text_projection", "text_projection.weight"),
    ),
    *_scope(
        r"backbone\.language_backbone\.encoder\.transformer\.resblocks\.(\d+)",
        r"text_encoder.text_model.encoder.layers.\1",
        (r"attn\.in_proj_(.+)", r"self_attn.in_proj_\2"),
        (r"attn\.out_proj\.(.+)", r"self_attn.out_proj.\2"),  # CLIP keeps the name out_proj
        (r"ln_([12])\.(.+)", r"layer_norm\2.\3"),
        (r"mlp\.c_fc\.(.+)", r"mlp.fc1.\2"),
        (r"mlp\.c_proj\.(.+)", r"mlp.fc2.\2"),
    ),
    (r"backbone\.language_backbone\.resizer\.(.+)", r"text_projection.\1"),
    # Geometry encoder (boxes; Meta's cross_attn_image is HF's cross_attn)
    *_scope(
        r"geometry_encoder",
        "geometry_encoder",
        (r"(label_embed|cls_embed|final_proj|boxes_\w+_project)\.(.+)", r"\1.\2"),
        (r"img_pre_norm\.(.+)", r"vision_layer_norm.\1"),
        (r"norm\.(.+)", r"prompt_layer_norm.\1"),
        (r"encode_norm\.(.+)", r"output_layer_norm.\1"),
    ),
    *_scope(
        r"geometry_encoder\.encode\.(\d+)",
        r"geometry_encoder.layers.\1",
        *_attention(r"\2", r"self_attn", "self_attn"),
        *_attention(r"\2", r"cross_attn_image", "cross_attn"),
        (r"linear([12])\.(.+)", r"mlp.fc\2.\3"),
        (r"norm([123])\.(.+)", r"layer_norm\2.\3"),
    ),
    # DETR encoder (image attends to the prompt)
    *_scope(
        r"transformer\.encoder\.layers\.(\d+)",
        r"detr_encoder.layers.\1",
        *_attention(r"\2", r"self_attn", "self_attn"),
        *_attention(r"\2", r"cross_attn_image", "cross_attn"),
        (r"linear([12])\.(.+)", r"mlp.fc\2.\3"),
        (r"norm([123])\.(.+)", r"layer_norm\2.\3"),
    ),
    # DETR decoder layers (Meta's cross_attn is the image cross-attention, ca_text the prompt one)
    *_scope(
        r"transformer\.decoder\.layers\.(\d+)",
        r"detr_decoder.layers.\1",
        *_attention(r"\2", r"self_attn", "self_attn"),
        *_attention(r"\2", r"ca_text", "text_cross_attn"),
        *_attention(r"\2", r"cross_attn", "vision_cross_attn"),
        (r"linear([12])\.(.+)", r"mlp.fc\2.\3"),
        (r"norm1\.(.+)", r"vision_cross_attn_layer_norm.\2"),
        (r"catext_norm\.(.+)", r"text_cross_attn_layer_norm.\2"),
        (r"norm2\.(.+)", r"self_attn_layer_norm.\2"),
        (r"norm3\.(.+)", r"mlp_layer_norm.\2"),
    ),
    # DETR decoder: queries, presence token and the head MLPs
    *_scope(
        r"transformer\.decoder",
        "detr_decoder",
        (r"(query_embed|reference_points|presence_token)\.(.+)", r"\1.\2"),
        (r"presence_token_out_norm\.(.+)", r"presence_layer_norm.\1"),
        (r"norm\.(.+)", r"output_layer_norm.\1"),
    ),
    _mlp(r"transformer\.decoder\.presence_token_head", "detr_decoder.presence_head"),
    _mlp(r"transformer\.decoder\.bbox_embed", "detr_decoder.box_head"),
    _mlp(r"transformer\.decoder\.ref_point_head", "detr_decoder.ref_point_head"),
    _mlp(r"transformer\.decoder\.boxRPB_embed_x", "detr_decoder.box_rpb_embed_x"),
    _mlp(r"transformer\.decoder\.boxRPB_embed_y", "detr_decoder.box_rpb_embed_y"),
    # Dot-product scoring
    _mlp(r"dot_prod_scoring\.prompt_mlp", "dot_product_scoring.text_mlp"),
    *_scope(
        r"dot_prod_scoring",
        "dot_product_scoring",
        (r"prompt_mlp\.out_norm\.(.+)", r"text_mlp_out_norm.\1"),
        (r"prompt_proj\.(.+)", r"text_proj.\1"),
        (r"hs_proj\.(.+)", r"query_proj.\1"),
    ),
    # Mask decoder: pixel decoder, mask embedder, instance + semantic heads, prompt cross-attention
    *_scope(
        r"segmentation_head",
        "mask_decoder",
        (r"pixel_decoder\.(conv_layers|norms)\.(.+)", r"pixel_decoder.\1.\2"),
        (r"(mask_predictor\.)?mask_embed\.layers\.(.+)", r"mask_embedder.layers.\2"),
        (r"instance_seg_head\.(.+)", r"instance_projection.\1"),
        (r"semantic_seg_head\.(.+)", r"semantic_projection.\1"),
        *_attention(r"\1", r"cross_attend_prompt", "prompt_cross_attn"),
        (r"cross_attn_norm\.(.+)", r"prompt_cross_attn_norm.\1"),
    ),
)

_COMPILED = tuple((re.compile(p), t) for p, t in RULES)
_DROPPED = tuple(re.compile(p) for p in DROPPED)
# A fused (3 * d, ...) projection: ViT ``attention.qkv.{weight,bias}``, MHA ``in_proj_{weight,bias}``.
_FUSED = re.compile(r"(.+)\.(?:qkv\.|in_proj_)(weight|bias)")


def hf_name(meta_key: str) -> str | None:
    """HF name of one Meta detector key (prefix already removed); None if HF drops the tensor.

    Fused projections come back with their ``qkv`` / ``in_proj_`` marker, resolved by the split.
    """
    if any(p.fullmatch(meta_key) for p in _DROPPED):
        return None
    for pattern, target in _COMPILED:
        m = pattern.fullmatch(meta_key)
        if m:
            return target(m) if callable(target) else m.expand(target)
    raise ValueError(
        f"no conversion rule for Meta SAM 3 key {meta_key!r}: is this a sam3 image-model "
        "checkpoint of the published architecture? (sam3_convert.RULES lists the known layout)"
    )


def _convert_tensor(name: str, tensor: torch.Tensor) -> dict[str, torch.Tensor]:
    """One renamed tensor -> its HF tensors (splits, slot drops and transposes are copies)."""
    fused = _FUSED.fullmatch(name)
    if fused:
        assert tensor.shape[0] % 3 == 0, f"{name}: fused projection of shape {tuple(tensor.shape)}"
        base, kind = fused.groups()
        q, k, v = tensor.chunk(3, dim=0)  # Meta stacks [q; k; v] along the output dimension
        return {f"{base}.{p}_proj.{kind}": t.clone() for p, t in zip("qkv", (q, k, v), strict=True)}
    if name == "vision_encoder.backbone.embeddings.position_embeddings":
        # (1, 1 + P*P, C): Meta keeps a slot for the pretraining class token, HF does not
        n = tensor.shape[1] - 1
        assert int(n**0.5) ** 2 == n, f"{name}: {tuple(tensor.shape)} is not 1 + a square grid"
        return {name: tensor[:, 1:].clone()}
    if name == "text_encoder.text_projection.weight":
        return {name: tensor.t().contiguous()}  # Meta applies x @ W, HF's Linear x @ W.T
    return {name: tensor}


def meta_to_hf(
    state_dict: Mapping[str, torch.Tensor], prefix: str = META_PREFIX
) -> dict[str, torch.Tensor]:
    """Meta SAM 3 detector tensors -> HF ``Sam3Model`` tensors (see the module docstring).

    ``prefix`` selects the detector keys (``"detector."`` in ``sam3.pt``; ``""`` for the
    ``state_dict()`` of a model built by ``sam3.build_sam3_image_model``). Keys without it are
    ignored. Dtypes are kept. Raises ``ValueError`` on a detector key no rule covers and on two
    keys mapping to one name.
    """
    out: dict[str, torch.Tensor] = {}
    for key, tensor in state_dict.items():
        if not key.startswith(prefix):
            continue
        name = hf_name(key[len(prefix) :])
        if name is None:
            continue
        for hf_key, hf_tensor in _convert_tensor(name, tensor).items():
            if hf_key in out:
                raise ValueError(f"two Meta keys map to {hf_key!r} (the second is {key!r})")
            out[hf_key] = hf_tensor
    return out


def check_complete(hf_state: Mapping[str, torch.Tensor], config: Any = None) -> None:
    """Raise ``ValueError`` unless ``hf_state`` has exactly the keys and shapes of ``Sam3Model``.

    The model is instantiated on the meta device (no memory, no initialisation).
    """
    from transformers import Sam3Config, Sam3Model  # heavy: transformers, only on this path

    with torch.device("meta"):
        expected = Sam3Model(config or Sam3Config()).state_dict()
    missing = sorted(set(expected) - set(hf_state))
    extra = sorted(set(hf_state) - set(expected))
    shapes = [
        f"{k}: {tuple(hf_state[k].shape)} != {tuple(v.shape)}"
        for k, v in expected.items()
        if k in hf_state and hf_state[k].shape != v.shape
    ]
    if missing or extra or shapes:
        raise ValueError(
            f"converted SAM 3 state does not match Sam3Model: {len(missing)} missing "
            f"{missing[:5]}, {len(extra)} unexpected {extra[:5]}, shape mismatches {shapes[:5]}"
        )


def meta_sam3_config() -> Any:
    """``Sam3Config()`` with the ViT LayerNorm eps Meta's model was trained with (1e-5).

    HF's default (1e-6, also what transformers' own converter writes) is not Meta's: on shared
    random weights, eight ViT blocks at 1008 px then differ from Meta by 8e-4 (scale 8) instead
    of 5e-6. Every other LayerNorm already uses PyTorch's 1e-5 on both sides.
    """
    from transformers import Sam3Config  # heavy: transformers, only on this path

    config = Sam3Config()
    config.vision_config.backbone_config.layer_norm_eps = META_VIT_LAYER_NORM_EPS
    return config


def load_meta_checkpoint(path: Path) -> dict[str, torch.Tensor]:
    """Tensors of a Meta ``sam3.pt`` (flat, or nested under ``"model"`` as training saves it)."""
    ckpt = torch.load(Path(path), map_location="cpu", weights_only=True)
    if isinstance(ckpt.get("model"), dict):
        ckpt = ckpt["model"]
    return ckpt


def convert_checkpoint(meta_pt_path: Path, out_dir: Path) -> Path:
    """Write ``out_dir`` as an HF SAM 3 checkpoint converted from Meta's ``sam3.pt``.

    Files: ``config.json`` (:func:`meta_sam3_config`), ``model.safetensors`` (all 1468 tensors,
    checked before writing), CLIP tokenizer files and ``preprocessor_config.json``.
    """
    from safetensors.torch import save_file  # heavy: safetensors' torch loader
    from transformers import Sam3ImageProcessor  # heavy: transformers, only on this path


    state = meta_to_hf(load_meta_checkpoint(meta_pt_path))
    config = meta_sam3_config()
    check_complete(state, config)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config.architectures = ["Sam3Model"]
    config.save_pretrained(out)
    tensors = {k: v.contiguous() for k, v in sorted(state.items())}
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    Sam3ImageProcessor().save_pretrained(out)
    vocab.write_clip_tokenizer(out)
    return out


def main(argv: list[str] | None = None) -> Path:
    """``python -m conceptseg.sam3_convert sam3.pt OUT_DIR``."""

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("meta_pt_path", type=Path, help="Meta's sam3.pt")
    parser.add_argument("out_dir", type=Path, help="directory to write the HF checkpoint into")
    args = parser.parse_args(argv)
    return convert_checkpoint(args.meta_pt_path, args.out_dir)


if __name__ == "__main__":
    print(main())
