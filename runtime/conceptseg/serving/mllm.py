"""The ``mllm`` model's tensors (messages JSON + images in, text + states out), both sides.

:class:`TritonMllm` is the orchestrator's :class:`~conceptseg.protocols.MLLMBackend` over BLS;
``serving.mllm_model`` is the ``mllm`` model's side.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
from PIL import Image

from conceptseg import contract, limits
from conceptseg.config import PipelineConfig
from conceptseg.protocols import Generation
from conceptseg.serving.bls import Bls, EngineError
from conceptseg.textstream import OnText
from conceptseg.types import RequestError

MLLM_INPUTS = ("messages", "images")
MLLM_OUTPUTS = (
    "text",
    "token_ids",
    "hidden",
    "prompt_tokens",
    "stopped",
    "prefill_ms",
    "decode_ms",
)


def to_mllm_arrays(
    messages: list[dict[str, Any]], images: list[Image.Image]
) -> dict[str, np.ndarray]:
    return {
        "messages": np.array([json.dumps(messages).encode()], dtype=np.object_),
        "images": np.array([contract.encode_image(i) for i in images], dtype=np.object_),
    }


ROLES = ("system", "user", "assistant")
MAX_MLLM_IMAGES = 2  # the reference prompt's [mosaic, target]
MAX_MESSAGES_BYTES = 64 << 10


def from_mllm_arrays(
    arrays: dict[str, np.ndarray], cfg: PipelineConfig | None = None
) -> tuple[list[dict[str, Any]], list[Image.Image]]:
    """Messages and images of an ``mllm`` request, re-checked (clients can call the model
    directly): chat messages of text and image entries only, one image per image entry, at most
    two, each an encoded PNG or JPEG within the request limits. RequestError names the field."""
    cfg = cfg or PipelineConfig()
    raw = bytes(np.asarray(arrays["messages"]).ravel()[0])
    if len(raw) > MAX_MESSAGES_BYTES:
        raise RequestError("messages", f"{len(raw)} bytes; at most {MAX_MESSAGES_BYTES}")
    try:
        messages = json.loads(raw)
    except (UnicodeDecodeError, ValueError):
        raise RequestError("messages", "not UTF-8 JSON; send a list of chat messages") from None
    wanted = _image_entries(messages)
    blobs = list(np.asarray(arrays["images"]).ravel())
    if len(blobs) != wanted or wanted > MAX_MLLM_IMAGES:
        raise RequestError(
            "images",
            f"{len(blobs)} images for {wanted} image entries; one each, at most {MAX_MLLM_IMAGES}",
        )
    budget = limits.PixelBudget(cfg)
    images = [contract.decode_image(bytes(b), f"images[{i}]", cfg, budget)
              for i, b in enumerate(blobs)]  # fmt: skip
    return messages, images


def _image_entries(messages: Any) -> int:
    """The image entries of well-formed chat messages (RequestError for anything else)."""
    if not isinstance(messages, list) or not messages:
        raise RequestError("messages", "must be a non-empty JSON list of {role, content}")
    count = 0
    for i, message in enumerate(messages):
        ok = isinstance(message, dict) and message.get("role") in ROLES
        content = message.get("content") if ok else None
        if not ok or not isinstance(content, list | str):
            raise RequestError(f"messages[{i}]", f"needs role in {ROLES} and a content list")
        for entry in content if isinstance(content, list) else []:
            kind = entry.get("type") if isinstance(entry, dict) else None
            if kind == "image":
                count += 1
            elif kind != "text" or not isinstance(entry.get("text"), str):
                raise RequestError(f"messages[{i}]", "content entries are text or image only")
    return count


def generation_to_arrays(gen: Generation) -> dict[str, np.ndarray]:
    return {
        "text": np.array([gen.text.encode()], dtype=np.object_),
        "token_ids": np.asarray(gen.token_ids, np.int64).reshape(-1),
        "hidden": np.asarray(gen.hidden, np.float32),
        "prompt_tokens": np.array([gen.prompt_tokens], np.int64),
        "stopped": np.array([gen.stopped], np.bool_),
        "prefill_ms": np.array([gen.prefill_ms], np.float32),
        "decode_ms": np.array([gen.decode_ms], np.float32),
    }


def generation_from_arrays(out: dict[str, np.ndarray]) -> Generation:
    return Generation(
        text=text_of(out),
        token_ids=[int(t) for t in out["token_ids"]],
        hidden=np.asarray(out["hidden"], np.float32),
        prompt_tokens=int(out["prompt_tokens"][0]),
        stopped=bool(out["stopped"][0]),
        prefill_ms=float(out["prefill_ms"][0]),
        decode_ms=float(out["decode_ms"][0]),
    )


def text_of(arrays: dict[str, np.ndarray]) -> str:
    return bytes(np.asarray(arrays["text"]).ravel()[0]).decode("utf-8")


class TritonMllm:
    """:class:`MLLMBackend` calling the (decoupled) ``mllm`` model: with ``on_text`` it asks for
    the text deltas as interim responses; the final response holds the whole generation.
    ``request_id`` names the generation for :meth:`cancel` (a BLS call cannot be cancelled in
    Triton 2.51, so the cancel is a request of its own)."""

    def __init__(self, bls: Bls, model: str = "mllm") -> None:
        self.bls, self.model = bls, model

    def generate(
        self,
        messages: list[dict[str, Any]],
        images: list[Image.Image],
        on_text: OnText | None = None,
        request_id: str = "",
    ) -> Generation:
        inputs = to_mllm_arrays(messages, images)
        inputs["stream"] = np.array([on_text is not None], np.bool_)
        if request_id:
            inputs["request_id"] = np.array([request_id.encode()], dtype=np.object_)
        final = None
        for arrays in self.bls.stream(self.model, inputs, MLLM_OUTPUTS):
            if "token_ids" in arrays:
                final = arrays
            elif on_text is not None and "text" in arrays:
                on_text(text_of(arrays))
        if final is None:
            raise EngineError(f"{self.model}: the response stream ended without the generation")
        return generation_from_arrays(final)

    def cancel(self, request_id: str) -> None:
        """End the generation ``request_id`` at its next step (it answers CANCELLED)."""
        inputs = {"cancel": np.array([request_id.encode()], dtype=np.object_)}
        for _ in self.bls.stream(self.model, inputs, ()):
            pass
