"""Data that crosses step boundaries. Pure: numpy and PIL only.

Geometry conventions used everywhere in the package:
- boxes are ``(x1, y1, x2, y2)`` in pixels of the image they refer to, x to the right, y down;
- masks are boolean ``(H, W)`` numpy arrays;
- image sizes are given as ``(width, height)`` (PIL's order) unless a name says ``hw``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image

Box = tuple[float, float, float, float]


class RequestError(ValueError):
    """A request the runtime refuses, with a message naming the field and the rule.

    Raised for user input only (the CLI prints it, the server turns it into INVALID_ARG);
    programmer errors stay ``assert``s.
    """

    def __init__(self, field_name: str, message: str) -> None:
        super().__init__(f"{field_name}: {message}")
        self.field, self.message = field_name, message


class Cancelled(RuntimeError):
    """The request's client went away (disconnect, deadline, cancelled stream): its work stopped.
    The server answers CANCELLED; every message starts with :attr:`PREFIX`."""

    PREFIX = "cancelled: "

    def __init__(self, reason: str) -> None:
        super().__init__(reason if reason.startswith(self.PREFIX) else self.PREFIX + reason)


class AtCapacity(RuntimeError):
    """Every slot and queue place is taken: the request was refused at once, untouched. The
    server answers UNAVAILABLE; retry later (with backoff) or against another replica. Every
    message contains :attr:`MARK`."""

    MARK = "at capacity"


class EngineDown(RuntimeError):
    """A model the request was waiting on lost its process mid-call (the server brings it back
    within seconds): the request failed, nothing else. The server answers UNAVAILABLE; retry.
    Every message contains :attr:`MARK`."""

    MARK = "the model is down"


class UsageError(ValueError):
    """A command-line, file or environment mistake (not a request field): the CLI prints
    ``error: <argument>: <message>`` and exits 2."""

    def __init__(self, argument: str, message: str) -> None:
        super().__init__(f"{argument}: {message}")
        self.argument, self.message = argument, message


@dataclass(frozen=True)
class Answer:
    """What the MLLM's tagged text says (``conceptseg.tags.parse``)."""

    think: str = ""
    rule: str | None = None
    check: Box | None = None  # proxy box of reference tile 0, mosaic canvas pixels
    bbox: Box | None = None  # target box, 600x600-resized target pixels as written
    answer: str = ""
    complete: bool = False  # an <answer> pair was closed


@dataclass(frozen=True)
class Reference:
    """One reference image and where the concept is in it: a box (xyxy pixels) or a mask."""

    image: Image.Image
    box: Box | None = None
    mask: np.ndarray | None = None  # bool (H, W), same size as image


@dataclass(frozen=True)
class Request:
    """One segmentation request: the target, the question, 0-4 references."""

    image: Image.Image
    question: str
    references: tuple[Reference, ...] = ()


@dataclass
class Instance:
    """One SAM 3 instance of the final call: score, xyxy box (target pixels), bool (H, W) mask."""

    score: float
    bbox: Box
    mask: np.ndarray


@dataclass
class Result:
    """The pipeline's answer for one request. Boxes are in original target-image pixels."""

    mask: np.ndarray  # bool (H, W) of the target image
    route: str  # "fast" (SAM 3 only) or "reason" (MLLM + CTM + SAM 3)
    presence: float | None  # router probe score, None when the probe was skipped
    threshold: float
    answer: Answer = field(default_factory=Answer)
    text: str = ""  # raw MLLM completion
    bbox: Box | None = None  # answer box mapped to the target image
    check: Box | None = None  # proxy box mapped to reference 0's image
    tokens: int = 0  # generated tokens (reason route)
    timings_ms: dict[str, float] = field(default_factory=dict)
    versions: dict[str, Any] = field(default_factory=dict)
    instances: list[Instance] = field(default_factory=list)  # when asked for, score >= threshold

    def to_json(self) -> dict[str, Any]:
        return {
            "route": self.route,
            "presence": self.presence,
            "threshold": self.threshold,
            "answer": self.answer.answer,
            "answer_complete": self.answer.complete,
            "think": self.answer.think,
            "rule": self.answer.rule,
            "bbox": list(self.bbox) if self.bbox else None,
            "check": list(self.check) if self.check else None,
            "tokens": self.tokens,
            "mask_pixels": int(self.mask.sum()),
            "mask_size_hw": list(self.mask.shape),
            "text": self.text,
            "timings_ms": {k: round(v, 3) for k, v in self.timings_ms.items()},
            "versions": self.versions,
            "instances": [{"score": i.score, "bbox": list(i.bbox)} for i in self.instances],
        }
