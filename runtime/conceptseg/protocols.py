"""Backend interfaces the pipeline is written against. Data crossing them is numpy and PIL.

Each step of ``conceptseg.pipeline`` talks to one of these; the torch reference, ONNX Runtime,
TensorRT and Triton (BLS) implementations are interchangeable behind them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
from PIL import Image


@dataclass
class Generation:
    """One greedy completion.

    ``token_ids``: the generated ids, the stop token included when one was produced.
    ``hidden``: (len(token_ids), H) float32, the last layer's states after the final norm at the
    positions where each generated token is the *input* (what a full re-forward over prompt +
    completion gives at those positions); this is what the CTM reads.
    """

    text: str
    token_ids: list[int]
    hidden: np.ndarray
    prompt_tokens: int
    stopped: bool  # ended on a stop token (False: hit the token limit)
    prefill_ms: float = 0.0
    decode_ms: float = 0.0


class MLLMBackend(Protocol):
    def generate(
        self,
        messages: list[dict[str, Any]],
        images: list[Image.Image],
        on_text: Callable[[str], None] | None = None,
    ) -> Generation:
        """Greedy-decode the answer to ``messages`` whose image entries are ``images`` in order.
        ``on_text``: called with the completion's text in deltas as it is generated; the deltas
        join to ``Generation.text`` (see :mod:`conceptseg.textstream`)."""
        ...


@dataclass
class SegOutput:
    """SAM 3's answer for one prompt on one image.

    ``presence``: sigmoid of the presence logit. ``semantic_logits``: (h, w) float32 logits of the
    semantic head (288x288 at 1008 input); the mask is ``logits > 0`` after resizing.
    ``scores``/``boxes``: per-query instance scores (sigmoid(logit) x presence) and xyxy boxes
    normalised to [0, 1], best first; ``instance_logits`` (K, h, w) their mask logits, in the same
    order, when the call asked for instances.
    """

    presence: float
    semantic_logits: np.ndarray
    scores: np.ndarray | None = None
    boxes: np.ndarray | None = None
    instance_logits: np.ndarray | None = None


class SegBackend(Protocol):
    def encode_image(self, image: Image.Image) -> Any:
        """Image features for ``image`` (opaque to the pipeline; computed once per request)."""
        ...

    def segment(
        self, features: Any, text: str, concept: np.ndarray | None = None, instances: bool = False
    ) -> SegOutput:
        """Prompt SAM 3 with ``text`` and optional concept tokens (Q, 256) prepended to it;
        ``instances``: also return the instance mask logits."""
        ...


class CTMBackend(Protocol):
    def __call__(self, hidden: np.ndarray) -> np.ndarray:
        """Concept tokens (Q, 256) float32 from completion states (L, H)."""
        ...
