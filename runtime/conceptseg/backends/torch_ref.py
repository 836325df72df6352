"""The torch reference backends: transformers' ``Sam3Model`` and our CTM module (``--backend torch``).

Prompts follow Meta's structure (METHOD.md section 6): the geometry encoder always runs, here
with one padding box (label -10), which is what makes HF's outputs match Meta's. Concept tokens
(Q, 256) are prepended to the 32 text tokens with Q extra valid mask entries. Image features are
computed once per image; text features once per (cleaned) string.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from tokenizers import Tokenizer
from transformers import AutoTokenizer

from conceptseg.checkpoints import load_ctm
from conceptseg.models.ctm import ConceptTranslationModule
from conceptseg.models.qwen import quiet_transformers
from conceptseg.models.sam3_inputs import (
    Sam3Tokenizer,
    padding_box,
    preprocess,
)
from conceptseg.protocols import SegOutput


@dataclass
class Sam3Image:
    """SAM 3 image features of one image (what ``encode_image`` returns)."""

    vision: Any  # Sam3VisionEncoderOutput


def clip_tokenizer(checkpoint: Path) -> Sam3Tokenizer:
    """SAM 3's tokenizer from the ``vocab.json`` + ``merges.txt`` of a HF checkpoint
    (transformers' converter); ``Sam3Tokenizer.save`` writes what the engines read."""
    fast = AutoTokenizer.from_pretrained(checkpoint)
    return Sam3Tokenizer(Tokenizer.from_str(fast.backend_tokenizer.to_str()), int(fast.pad_token_id))


def geometry_padding(batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One padding box per row (``sam3_inputs.padding_box``) as torch tensors."""
    boxes, labels = padding_box(batch)
    return torch.from_numpy(boxes), torch.from_numpy(labels)


def seg_output(out: Any, instances: bool = False) -> SegOutput:
    """Row 0 of ``Sam3Model`` outputs -> :class:`SegOutput` (queries sorted by score)."""
    presence = torch.sigmoid(out.presence_logits[0, 0]).item()
    scores = (torch.sigmoid(out.pred_logits[0]) * presence).float().numpy()
    order = np.argsort(-scores, kind="stable")
    return SegOutput(
        presence=presence,
        semantic_logits=out.semantic_seg[0, 0].float().numpy(),
        scores=scores[order],
        boxes=out.pred_boxes[0].float().numpy()[order],
        instance_logits=out.pred_masks[0].float().numpy()[order] if instances else None,
    )


def to_float32(output: Any) -> Any:
    """Every floating tensor of a transformers ``ModelOutput`` (tuples too) cast to float32."""

    def cast(value: Any) -> Any:
        if isinstance(value, torch.Tensor) and value.is_floating_point():
            return value.float()
        if isinstance(value, tuple):
            return tuple(cast(v) for v in value)
        return value

    for key, value in list(output.items()):
        output[key] = cast(value)
    return output


class TorchSam3:
    """``encode_image`` / ``segment`` with transformers' SAM 3 (fp32, CPU or CUDA).

    ``precision="bf16"`` runs the image encoder (~90 % of SAM 3's compute) under
    ``torch.autocast(dtype=torch.bfloat16)`` (AMX / AVX512-BF16 kernels on CPUs that have them)
    and hands fp32 features to the heads; text encoder and heads stay fp32.
    """

    def __init__(
        self, directory: Path, *, device: str = "cpu", text_cache: int = 256, precision: str = "fp32"
    ) -> None:
        from transformers import Sam3Model  # the transformers model class: this backend's stack

        assert precision in ("fp32", "bf16"), f"torch SAM 3 runs fp32 or bf16, not {precision!r}"
        quiet_transformers()
        self.precision = precision
        self.directory = Path(directory)
        self.model = Sam3Model.from_pretrained(self.directory).eval().to(device)
        self.device = device
        self.side = self.model.config.vision_config.backbone_config.image_size
        self.tokenize = clip_tokenizer(self.directory)
        self._text: OrderedDict[str, tuple[torch.Tensor, torch.Tensor]] = OrderedDict()
        self._text_cache = text_cache

    @torch.inference_mode()
    def encode_image(self, image: Image.Image) -> Sam3Image:
        pixels = torch.from_numpy(preprocess(image, self.side)).to(self.device)
        if self.precision == "fp32":
            return Sam3Image(self.model.get_vision_features(pixel_values=pixels))
        with torch.autocast(torch.device(self.device).type, dtype=torch.bfloat16):
            vision = self.model.get_vision_features(pixel_values=pixels)
        return Sam3Image(to_float32(vision))

    @torch.inference_mode()
    def text_features(self, text: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(1, 32, 256) prompt features and (1, 32) mask for ``text``, cached per string."""
        if text in self._text:
            self._text.move_to_end(text)
            return self._text[text]
        ids, mask = (torch.from_numpy(a).to(self.device) for a in self.tokenize(text))
        feats = self.model.get_text_features(input_ids=ids, attention_mask=mask).pooler_output
        self._text[text] = (feats, mask)
        if len(self._text) > self._text_cache:
            self._text.popitem(last=False)
        return feats, mask

    @torch.inference_mode()
    def heads(self, image: Sam3Image, prompt: torch.Tensor, mask: torch.Tensor) -> Any:
        """Run the detector on precomputed image features and a (1, L, 256) prompt with its mask."""
        from transformers.modeling_outputs import BaseModelOutputWithPooling  # as Sam3Model

        boxes, labels = geometry_padding(prompt.shape[0])
        return self.model(
            vision_embeds=image.vision,
            text_embeds=BaseModelOutputWithPooling(pooler_output=prompt),
            attention_mask=mask,
            input_boxes=boxes.to(self.device),
            input_boxes_labels=labels.to(self.device),
        )

    def segment(
        self,
        features: Sam3Image,
        text: str,
        concept: np.ndarray | None = None,
        instances: bool = False,
    ) -> SegOutput:
        feats, mask = self.text_features(text)
        if concept is not None:
            tokens = torch.from_numpy(np.asarray(concept, np.float32))[None].to(
                self.device, feats.dtype
            )
            feats = torch.cat([tokens, feats], dim=1)
            mask = torch.cat(
                [torch.ones(1, tokens.shape[1], dtype=mask.dtype, device=self.device), mask], dim=1
            )
        return seg_output(self.heads(features, feats, mask), instances)


class TorchCtm:
    """:class:`~conceptseg.protocols.CTMBackend` over the torch module (one request at a time)."""

    def __init__(self, module: ConceptTranslationModule) -> None:
        self.module = module.eval()

    @torch.inference_mode()
    def __call__(self, hidden: np.ndarray) -> np.ndarray:  # (L, H) float32 -> (Q, 256) float32
        param = next(self.module.parameters())
        h = torch.from_numpy(np.asarray(hidden, np.float32))[None].to(param.device, param.dtype)
        return self.module(h)[0].float().cpu().numpy()


def torch_sam3(sam3_dir: Path, precision: str = "fp32") -> TorchSam3:
    """SAM 3 in transformers on the HF-format checkpoint ``sam3_dir`` (image encoder in
    ``precision``: fp32 or bf16 autocast)."""
    return TorchSam3(sam3_dir, precision=precision)


def torch_ctm(mllm_dir: Path) -> TorchCtm:
    """The CTM module on the ConceptSeg-R1 checkpoint ``mllm_dir``'s CTM keys."""
    return TorchCtm(load_ctm(mllm_dir))
