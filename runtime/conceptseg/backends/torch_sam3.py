"""The reference SAM 3 backend: transformers' ``Sam3Model`` on a local HF-format checkpoint.

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

from conceptseg.backends.base import SegOutput
from conceptseg.vocab import clean_clip_text

TEXT_CONTEXT = 32
PAD_BOX_LABEL = -10


@dataclass
class Sam3Image:
    """SAM 3 image features of one image (what ``encode_image`` returns)."""

    vision: Any  # Sam3VisionEncoderOutput


def preprocess(image: Image.Image, side: int) -> torch.Tensor:
    """(1, 3, side, side): square bilinear antialiased resize, [0, 1], normalised with mean = std = 0.5."""
    import torchvision.transforms.v2.functional as TF

    x = torch.from_numpy(np.array(image.convert("RGB"))).permute(2, 0, 1)
    x = TF.resize(x, [side, side], interpolation=TF.InterpolationMode.BILINEAR, antialias=True)
    return ((x.float() / 255 - 0.5) / 0.5)[None]


class Sam3Tokenizer:
    """Meta's text cleaning, CLIP BPE, padded or truncated to 32 tokens. ``(ids, mask)`` int64 (1, 32)."""

    def __init__(self, directory: Path) -> None:
        from transformers import AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(directory)

    def __call__(self, text: str) -> tuple[np.ndarray, np.ndarray]:
        enc = self.tokenizer(
            clean_clip_text(text),
            padding="max_length",
            max_length=TEXT_CONTEXT,
            truncation=True,
            split_special_tokens=True,  # a literal "<|endoftext|>" in a prompt is text, as in Meta's
            return_tensors="np",
        )
        return enc["input_ids"].astype(np.int64), enc["attention_mask"].astype(np.int64)


def geometry_padding(batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One padding box per row: boxes (B, 1, 4) cxcywh and labels (B, 1) = -10."""
    return torch.zeros(batch, 1, 4), torch.full((batch, 1), PAD_BOX_LABEL, dtype=torch.long)


def seg_output(out: Any) -> SegOutput:
    """Row 0 of ``Sam3Model`` outputs -> :class:`SegOutput` (queries sorted by score)."""
    presence = torch.sigmoid(out.presence_logits[0, 0]).item()
    scores = (torch.sigmoid(out.pred_logits[0]) * presence).numpy()
    order = np.argsort(-scores, kind="stable")
    return SegOutput(
        presence=presence,
        semantic_logits=out.semantic_seg[0, 0].float().numpy(),
        scores=scores[order],
        boxes=out.pred_boxes[0].float().numpy()[order],
    )


class TorchSam3:
    """``encode_image`` / ``segment`` with transformers' SAM 3 (fp32, CPU or CUDA)."""

    def __init__(self, directory: Path, *, device: str = "cpu", text_cache: int = 256) -> None:
        from transformers import Sam3Model

        from conceptseg.backends.hf_mllm import quiet_transformers

        quiet_transformers()
        self.directory = Path(directory)
        self.model = Sam3Model.from_pretrained(self.directory).eval().to(device)
        self.device = device
        self.side = self.model.config.vision_config.backbone_config.image_size
        self.tokenize = Sam3Tokenizer(self.directory)
        self._text: OrderedDict[str, tuple[torch.Tensor, torch.Tensor]] = OrderedDict()
        self._text_cache = text_cache

    @torch.inference_mode()
    def encode_image(self, image: Image.Image) -> Sam3Image:
        pixels = preprocess(image, self.side).to(self.device)
        return Sam3Image(self.model.get_vision_features(pixel_values=pixels))

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
        from transformers.modeling_outputs import BaseModelOutputWithPooling

        boxes, labels = geometry_padding(prompt.shape[0])
        return self.model(
            vision_embeds=image.vision,
            text_embeds=BaseModelOutputWithPooling(pooler_output=prompt),
            attention_mask=mask,
            input_boxes=boxes.to(self.device),
            input_boxes_labels=labels.to(self.device),
        )

    def segment(
        self, features: Sam3Image, text: str, concept: np.ndarray | None = None
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
        return seg_output(self.heads(features, feats, mask))
