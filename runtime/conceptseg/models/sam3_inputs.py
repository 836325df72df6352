"""SAM 3's inputs and outputs in numpy: image preprocessing, the CLIP tokenizer, prompt slots.

One definition of each SAM 3 convention the backends share (METHOD.md section 6):
- the image: square resize to ``side`` (aspect not kept) exactly as torchvision's antialiased
  bilinear uint8 resize (what Meta's ``Sam3Processor`` runs), scaled to [0, 1], mean = std = 0.5;
- the text: Meta's cleaning, CLIP BPE, 32 tokens (``TEXT_CONTEXT``), special-token literals as text;
- the prompt: ``[concept slots (q_max); text (32)]`` with a validity mask, plus one padding box
  (label ``PAD_BOX_LABEL``) so the geometry encoder runs as in Meta's text-only prompts.
No torch and no transformers: this runs inside the Triton orchestrator.
"""

from __future__ import annotations

import html
from pathlib import Path

import ftfy
import numpy as np
from PIL import Image
from tokenizers import Tokenizer

from conceptseg.protocols import SegOutput
from conceptseg.types import RequestError

TEXT_CONTEXT = 32  # CLIP context of SAM 3's text encoder
PAD_BOX_LABEL = -10  # the geometry encoder's "not a box" label
TOKENIZER_FILE = "tokenizer.json"
CLIP_PAD_ID = 49407  # <|endoftext|>, the HF CLIP tokenizer's pad


# --- image --------------------------------------------------------------------------------------


def _resize_taps(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray, int]:
    """Source indices (n_out, K), int16-range integer weights (n_out, K) and their precision
    (bits) of an antialiased triangle filter: torch's uint8 ``_upsample_bilinear2d_aa`` weights
    (computed in double, normalised per output, rounded to the most bits int16 holds)."""
    scale = n_in / n_out
    support = scale if scale >= 1.0 else 1.0
    invscale = 1.0 / scale if scale >= 1.0 else 1.0
    centers = scale * (np.arange(n_out) + 0.5)
    lo = np.maximum((centers - support + 0.5).astype(np.int64), 0)
    hi = np.minimum((centers + support + 0.5).astype(np.int64), n_in)
    pos = lo[:, None] + np.arange(int((hi - lo).max()))[None, :]
    weights = np.clip(1.0 - np.abs((pos - centers[:, None] + 0.5) * invscale), 0.0, None)
    weights[pos >= hi[:, None]] = 0.0
    total = weights.sum(1, keepdims=True)
    weights = np.divide(weights, total, out=np.zeros_like(weights), where=total != 0)
    bits = 0
    while bits < 22 and int(0.5 + weights.max() * (1 << (bits + 1))) < (1 << 15):
        bits += 1
    fixed = np.trunc(weights * (1 << bits) + 0.5).astype(np.int32)  # weights are >= 0
    return np.minimum(pos, n_in - 1), fixed, bits


def _resize_axis(pixels: np.ndarray, axis: int, n_out: int) -> np.ndarray:
    if pixels.shape[axis] == n_out:
        return pixels
    index, weights, bits = _resize_taps(pixels.shape[axis], n_out)
    shape = [1] * pixels.ndim
    shape[axis] = n_out
    out_shape = (*pixels.shape[:axis], n_out, *pixels.shape[axis + 1 :])
    acc = np.full(out_shape, 1 << (bits - 1), np.int32)
    for tap in range(index.shape[1]):
        acc += np.take(pixels, index[:, tap], axis=axis).astype(np.int32) * weights[
            :, tap
        ].reshape(shape)
    return np.clip(acc >> bits, 0, 255).astype(np.uint8)


def resize_square(pixels: np.ndarray, side: int) -> np.ndarray:
    """(H, W, C) uint8 -> (side, side, C) uint8, bit-identical to torchvision's
    ``resize(..., BILINEAR, antialias=True)`` on uint8 (horizontal pass first, as torch)."""
    return _resize_axis(_resize_axis(pixels, 1, side), 0, side)


def preprocess(image: Image.Image, side: int) -> np.ndarray:
    """(1, 3, side, side) float32: square resize, [0, 1], normalised with mean = std = 0.5."""
    pixels = resize_square(np.asarray(image.convert("RGB")), side)
    scaled = pixels.astype(np.float32) / np.float32(255)
    return ((scaled - np.float32(0.5)) / np.float32(0.5)).transpose(2, 0, 1)[None].copy()


# --- text ---------------------------------------------------------------------------------------


def clean_clip_text(text: str) -> str:
    """Meta's SAM 3 text cleaning before BPE: ftfy, HTML unescape (twice), whitespace, lower case."""
    text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
    return " ".join(text.split()).lower()


class Sam3Tokenizer:
    """Meta's text cleaning, CLIP BPE, padded or truncated to 32 tokens -> ``(ids, mask)`` int64
    (1, 32), on a ``tokenizers.Tokenizer``: :meth:`from_dir` reads the ``tokenizer.json`` that
    ``conceptseg export`` writes (``backends.torch_ref.clip_tokenizer`` converts a checkpoint's
    CLIP files)."""

    def __init__(self, tokenizer: Tokenizer, pad_id: int) -> None:
        self.tokenizer = tokenizer
        self.tokenizer.encode_special_tokens = True  # "<|endoftext|>" in a prompt is text (Meta)
        self.tokenizer.enable_truncation(TEXT_CONTEXT)
        self.tokenizer.enable_padding(length=TEXT_CONTEXT, pad_id=pad_id)

    @classmethod
    def from_dir(cls, directory: Path) -> Sam3Tokenizer:
        path = Path(directory) / TOKENIZER_FILE
        if not path.is_file():
            raise RequestError(
                "--engines",
                f"{path} is missing; re-export with `conceptseg export` (it writes the SAM 3 "
                "tokenizer as tokenizer.json)",
            )
        tokenizer = Tokenizer.from_file(str(path))
        padding = tokenizer.padding  # saved with the file by :meth:`save`
        return cls(tokenizer, int(padding["pad_id"]) if padding else CLIP_PAD_ID)

    def save(self, directory: Path) -> Path:
        """``directory/tokenizer.json``, padding and truncation settings included."""
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / TOKENIZER_FILE
        self.tokenizer.save(str(path))
        return path

    @property
    def pad_id(self) -> int:
        padding = self.tokenizer.padding
        assert padding is not None
        return int(padding["pad_id"])

    def __call__(self, text: str) -> tuple[np.ndarray, np.ndarray]:
        enc = self.tokenizer.encode(clean_clip_text(text))
        ids = np.asarray([enc.ids], np.int64)
        return ids, np.asarray([enc.attention_mask], np.int64)


# --- prompt and heads ---------------------------------------------------------------------------


def build_prompt(
    text: np.ndarray, text_mask: np.ndarray, concept: np.ndarray | None, q_max: int
) -> tuple[np.ndarray, np.ndarray]:
    """The heads' static prompt: ``[concept slots (q_max); text (32)]`` and its mask.

    ``text`` (32, 256), ``text_mask`` (32,), ``concept`` (Q, 256) or None -> (q_max + 32, 256)
    float32 and (q_max + 32,) int64. Unused concept slots are zeros with mask 0, which SAM 3
    ignores exactly.
    """
    width = text.shape[-1]
    slots = np.zeros((q_max, width), np.float32)
    slot_mask = np.zeros(q_max, np.int64)
    if concept is not None:
        q = concept.shape[0]
        if q > q_max:
            raise RequestError(
                "concept", f"{q} concept tokens, but the heads graph has {q_max} slots"
            )
        slots[:q], slot_mask[:q] = concept, 1
    prompt = np.concatenate([slots, text.astype(np.float32)], axis=0)
    return prompt, np.concatenate([slot_mask, text_mask.astype(np.int64)])


def padding_box(batch: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """One padding box per row: boxes (B, 1, 4) float32 zeros, labels (B, 1) int64 = -10."""
    return np.zeros((batch, 1, 4), np.float32), np.full((batch, 1), PAD_BOX_LABEL, np.int64)


def heads_feeds(
    fpn: tuple[np.ndarray, np.ndarray, np.ndarray], prompt: np.ndarray, mask: np.ndarray
) -> dict[str, np.ndarray]:
    """The heads graph's inputs for one image and one prompt (batch of 1, one padding box)."""
    boxes, labels = padding_box(1)
    return {
        "fpn0": fpn[0],
        "fpn1": fpn[1],
        "fpn2": fpn[2],
        "prompt": prompt[None],
        "prompt_mask": mask[None],
        "boxes": boxes,
        "box_labels": labels,
    }


def heads_output(out: dict[str, np.ndarray], row: int = 0) -> SegOutput:
    """One row of the heads graph's outputs as a :class:`SegOutput` (instances already top-K)."""
    presence = float(1.0 / (1.0 + np.exp(-out["presence_logits"][row, 0])))
    masks = out.get("instance_masks")
    return SegOutput(
        presence=presence,
        semantic_logits=out["semantic_logits"][row, 0],
        scores=out["instance_scores"][row],
        boxes=out["instance_boxes"][row],
        instance_logits=None if masks is None else masks[row],
    )
