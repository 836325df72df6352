"""Qwen2.5-VL decoding rules shared by every MLLM backend (numpy; no torch, no transformers).

- token ids: the vision special tokens (never generated: suppressed) and ``<|im_end|>``;
- the stop rule: stop ids and repetition penalty from the checkpoint's ``generation_config.json``
  (as transformers' ``generate`` reads them), falling back to ``config.json``'s eos id;
- the decision rule: transformers' repetition penalty over prompt + completion, vision tokens
  suppressed, greedy (first maximum). ``qwen_torch`` is its twin for backends that hold torch
  logits; tests check the two agree.
- chat inputs: the processor's chat template and image processing, one call for all backends.
- M-RoPE positions of a prompt (transformers' ``get_rope_index`` for images), for backends that
  run the decoder themselves.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

# Qwen2.5-VL's special token ids (the published tokenizer's added tokens)
ENDOFTEXT_ID, IM_START_ID, IM_END_ID = 151643, 151644, 151645  # im_end: the turn's end
VISION_START_ID, VISION_END_ID, VISION_PAD_ID = 151652, 151653, 151654
IMAGE_PAD_ID, VIDEO_PAD_ID = 151655, 151656
VISION_TOKEN_IDS = (VISION_START_ID, VISION_END_ID, VISION_PAD_ID, IMAGE_PAD_ID, VIDEO_PAD_ID)


@dataclass(frozen=True)
class StopRule:
    """When decoding ends and how repeats are penalised (one checkpoint's generation config)."""

    stop_ids: frozenset[int]
    repetition_penalty: float = 1.0


def _json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.is_file() else {}


def stop_rule(directory: Path) -> StopRule:
    """``eos_token_id`` (int or list) and ``repetition_penalty`` of ``generation_config.json``;
    without it, ``config.json``'s (text) eos id; without either, ``<|im_end|>``."""
    directory = Path(directory)
    gen = _json(directory / "generation_config.json")
    config = _json(directory / "config.json")
    eos = gen.get("eos_token_id")
    if eos is None:
        eos = config.get("text_config", config).get("eos_token_id", IM_END_ID)
    ids = eos if isinstance(eos, list) else [eos]
    return StopRule(frozenset(int(i) for i in ids), float(gen.get("repetition_penalty", 1.0)))


def next_token(
    logits: np.ndarray,
    seen: np.ndarray,
    penalty: float,
    suppressed: tuple[int, ...] = VISION_TOKEN_IDS,
) -> int:
    """Greedy choice with transformers' repetition penalty and suppressed ids.

    ``logits`` (V,) float32 of the last position; ``seen`` int ids of prompt + completion so far.
    Seen ids' logits are divided by ``penalty`` when positive, multiplied when negative; the
    ``suppressed`` ids get -inf; the first maximum wins (as ``torch.argmax``).
    """
    logits = np.array(logits, dtype=np.float32).reshape(-1)
    if penalty != 1.0:
        ids = np.unique(seen)
        picked = logits[ids]
        logits[ids] = np.where(
            picked < 0, picked * np.float32(penalty), picked / np.float32(penalty)
        )
    logits[list(suppressed)] = -np.inf
    return int(np.argmax(logits))


def quiet_transformers() -> None:
    """Load reports list the CTM keys as "unexpected" for the MLLM class; they are expected here."""
    from transformers.utils import logging  # transformers: only where a backend already holds it

    logging.set_verbosity_error()
    logging.disable_progress_bar()


def load_processor(directory: Path) -> Any:
    """transformers' Qwen2.5-VL processor (chat template, tokenizer, image patching)."""
    from transformers import AutoProcessor  # transformers: only where a backend already holds it

    quiet_transformers()
    return AutoProcessor.from_pretrained(directory)


def as_text(text: str, specials: Any) -> str:
    """``text`` with every special-token string in it (``<|image_pad|>``, ``<|im_end|>``, ...)
    broken by a zero-width space after its first character: the tokenizer then reads it as the
    characters it is, never as a control token."""
    for token in sorted(specials, key=len, reverse=True):
        if token in text:
            text = text.replace(token, token[0] + "\u200b" + token[1:])
    return text


def chat_text(processor: Any, messages: list[dict[str, Any]]) -> str:
    """The prompt text of ``messages``, generation prompt added (the reference's call). The
    user's text is text: special tokens in it are neutralised (:func:`as_text`)."""
    specials = processor.tokenizer.get_added_vocab()
    safe = [
        {**m, "content": [
            {**c, "text": as_text(c["text"], specials)} if c.get("type") == "text" else c
            for c in m["content"]
        ]} if m["role"] == "user" and isinstance(m["content"], list) else m
        for m in messages
    ]  # fmt: skip
    return processor.apply_chat_template(safe, tokenize=False, add_generation_prompt=True)


def chat_inputs(
    processor: Any, messages: list[dict[str, Any]], images: list[Image.Image], tensors: str = "np"
) -> Any:
    """``input_ids``, ``pixel_values``, ``image_grid_thw``... of one prompt (``tensors``: "np"
    or "pt"), images in the order of the messages' image entries."""
    return processor(text=[chat_text(processor, messages)], images=images, return_tensors=tensors)


def mrope_positions(
    input_ids: np.ndarray, image_grid_thw: np.ndarray | None, merge: int = 2
) -> np.ndarray:
    """(3, L) int64 temporal/height/width positions of a prompt with images (no videos).

    As transformers' ``Qwen2_5_VLModel.get_rope_index``: text runs on all three axes from the
    last position + 1; an image's ``t*(h/merge)*(w/merge)`` placeholder tokens take the start
    position plus (0, row, column) (an image's time index is 0); the next text starts after the
    image's largest position. The next generated token's position is ``max + 1`` on all axes.
    """
    ids = np.asarray(input_ids, dtype=np.int64).reshape(-1)
    grids = np.zeros((0, 3), np.int64) if image_grid_thw is None else np.asarray(image_grid_thw)
    out = np.empty((3, len(ids)), np.int64)
    pads = np.flatnonzero(ids == IMAGE_PAD_ID)
    cursor, start, used = 0, 0, 0  # next token, its position, image placeholders consumed
    for t, h, w in grids.astype(np.int64):
        count = int(t * (h // merge) * (w // merge))
        if used + count > len(pads):
            raise ValueError(f"image_grid_thw asks for {used + count} image tokens, "
                             f"input_ids hold {len(pads)}")  # fmt: skip
        first = int(pads[used])
        text = first - cursor
        out[:, cursor:first] = start + np.arange(text)
        start += text
        rows = np.arange(h // merge).repeat(w // merge)
        cols = np.tile(np.arange(w // merge), h // merge)
        block = np.stack([np.zeros(count, np.int64), np.tile(rows, t), np.tile(cols, t)])
        out[:, first : first + count] = start + block
        start = int(out[:, first : first + count].max()) + 1
        cursor, used = first + count, used + count
    if used != len(pads):
        raise ValueError(f"input_ids hold {len(pads)} image tokens, image_grid_thw {used}")
    out[:, cursor:] = start + np.arange(len(ids) - cursor)
    return out
