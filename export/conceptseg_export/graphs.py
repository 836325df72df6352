"""Export-only wrappers: each module's ``forward`` is exactly one ONNX graph's contract.

Tensor names are shared by the exporter, the ONNX Runtime and TensorRT backends and the Triton
model configurations (``export_config.GRAPHS`` is the single source of them).

- ``sam3_vision``: ``image`` (B, 3, S, S) normalised pixels -> ``fpn0``, ``fpn1``, ``fpn2`` (the
  4x, 2x and 1x FPN levels; 288/144/72 at S = 1008; the 0.5x level is unused by the heads).
- ``sam3_text``: ``input_ids``, ``attention_mask`` (B, 32) int64 -> ``text_features`` (B, 32, 256).
- ``sam3_heads``: FPN levels + ``prompt`` (B, L, 256) + ``prompt_mask`` (B, L) int64 + ``boxes``
  (B, N, 4) normalised cxcywh + ``box_labels`` (B, N) int64 (1 pos, 0 neg, -10 padding) ->
  ``presence_logits`` (B, 1), ``semantic_logits`` (B, 1, 4g, 4g) and the top-K instances
  ``instance_scores`` (B, K) = sigmoid(logit) x sigmoid(presence), ``instance_boxes`` (B, K, 4)
  normalised xyxy, ``instance_masks`` (B, K, 4g, 4g) logits. L = Q_max concept slots + 32 text
  slots, padded with mask 0 (masked slots have exactly no effect, METHOD.md section 6).
- ``ctm``: ``hidden`` (B, S, H) + ``key_mask`` (B, S) int64 -> ``concept`` (B, Q, 256).
"""

from __future__ import annotations

import types

import torch
import torchvision
from torch import nn
from transformers.modeling_outputs import BaseModelOutputWithPooling
from transformers.models.sam3.modeling_sam3 import Sam3VisionEncoderOutput

SAM3_PARTS = ("sam3_vision", "sam3_text", "sam3_heads")


class VisionGraph(nn.Module):
    def __init__(self, sam3: nn.Module) -> None:
        super().__init__()
        self.sam3 = sam3

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, ...]:
        fpn = self.sam3.get_vision_features(pixel_values=image).fpn_hidden_states
        return fpn[0], fpn[1], fpn[2]


class TextGraph(nn.Module):
    def __init__(self, sam3: nn.Module) -> None:
        super().__init__()
        self.sam3 = sam3

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.sam3.get_text_features(
            input_ids=input_ids, attention_mask=attention_mask
        ).pooler_output


def _encode_boxes_batched(self, boxes, boxes_mask, boxes_labels, vision_features):  # type: ignore[no-untyped-def]
    """``Sam3GeometryEncoder._encode_boxes`` with one ROI tensor instead of a per-image list.

    The same computation; a list of per-image boxes would be traced as a split into exactly the
    export batch size, so the graph could not take another batch size.
    """

    batch_size, num_boxes = boxes.shape[:2]
    height, width = vision_features.shape[-2:]
    boxes_embed = self.boxes_direct_project(boxes)
    cx, cy, w, h = boxes.unbind(-1)
    xyxy = torch.stack([cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h], dim=-1)
    xyxy = xyxy * torch.tensor([width, height, width, height], dtype=xyxy.dtype, device=xyxy.device)
    index = torch.arange(batch_size, device=boxes.device, dtype=xyxy.dtype)[:, None, None].expand(
        -1, num_boxes, 1
    )
    rois = torch.cat([index, xyxy], dim=-1).reshape(-1, 5)  # (B * N, [batch index, x1, y1, x2, y2])
    sampled = torchvision.ops.roi_align(vision_features, rois, self.roi_size)
    pooled = self.boxes_pool_project(sampled).view(batch_size, num_boxes, self.hidden_size)
    boxes_embed = boxes_embed + pooled
    pos = self._encode_box_coordinates(cx.flatten(), cy.flatten(), w.flatten(), h.flatten())
    boxes_embed = boxes_embed + self.boxes_pos_enc_project(
        pos.view(batch_size, num_boxes, pos.shape[-1])
    )
    return self.label_embed(boxes_labels.long()) + boxes_embed, boxes_mask


class HeadsGraph(nn.Module):
    """SAM 3's detector on precomputed FPN levels; position encodings are rebuilt from shapes."""

    def __init__(self, sam3: nn.Module, top_k: int) -> None:
        super().__init__()

        self.sam3 = sam3
        self.top_k = top_k
        encoder = sam3.geometry_encoder
        encoder._encode_boxes = types.MethodType(_encode_boxes_batched, encoder)

    def forward(self, fpn0, fpn1, fpn2, prompt, prompt_mask, boxes, box_labels):  # type: ignore[no-untyped-def]

        levels = (fpn0, fpn1, fpn2, fpn2)  # the model drops the last level; fpn2 stands in for it
        encode = self.sam3.vision_encoder.neck.position_encoding
        vision = Sam3VisionEncoderOutput(
            fpn_hidden_states=levels,
            fpn_position_encoding=tuple(encode(x.shape, x.device, x.dtype) for x in levels),
        )
        out = self.sam3(
            vision_embeds=vision,
            text_embeds=BaseModelOutputWithPooling(pooler_output=prompt),
            attention_mask=prompt_mask,
            input_boxes=boxes,
            input_boxes_labels=box_labels,
        )
        presence = out.presence_logits  # (B, 1)
        scores = torch.sigmoid(out.pred_logits) * torch.sigmoid(presence)  # (B, queries)
        top, index = torch.topk(scores, self.top_k, dim=1)  # (B, K)
        top_boxes = torch.gather(out.pred_boxes, 1, index[..., None].expand(-1, -1, 4))
        h, w = out.pred_masks.shape[-2:]
        top_masks = torch.gather(out.pred_masks, 1, index[..., None, None].expand(-1, -1, h, w))
        return presence, out.semantic_seg, top, top_boxes, top_masks


class CtmGraph(nn.Module):
    def __init__(self, ctm: nn.Module) -> None:
        super().__init__()
        self.ctm = ctm

    def forward(self, hidden: torch.Tensor, key_mask: torch.Tensor) -> torch.Tensor:
        return self.ctm(hidden, key_mask)
