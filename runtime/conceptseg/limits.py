"""The request limits, each rule written once (the pipeline, the wire contract and the CLI
call these). Pure: each raises :class:`RequestError` naming the field and the rule."""

from __future__ import annotations

from conceptseg.config import PipelineConfig
from conceptseg.mosaic import MAX_REFERENCES
from conceptseg.types import RequestError


def check_pixels(name: str, width: int, height: int, cfg: PipelineConfig) -> None:
    """A non-empty image within ``cfg.max_image_pixels``."""
    if width == 0 or height == 0:
        raise RequestError(name, f"zero-size image ({width}x{height}); give a non-empty image")
    if width * height > cfg.max_image_pixels:
        raise RequestError(
            name,
            f"{width}x{height} is over the limit of {cfg.max_image_pixels} pixels; downscale it",
        )


def check_bytes(name: str, size: int, cfg: PipelineConfig) -> None:
    """A non-empty encoded image within ``cfg.max_image_bytes``."""
    if size == 0:
        raise RequestError(name, "zero-size image (0 bytes); send an encoded PNG or JPEG")
    if size > cfg.max_image_bytes:
        raise RequestError(
            name, f"{size} bytes is over the limit of {cfg.max_image_bytes}; downscale it"
        )


def check_prompt(question: object, cfg: PipelineConfig) -> None:
    """Non-empty text of at most ``cfg.max_prompt_chars`` characters."""
    if not isinstance(question, str) or not question.strip():
        raise RequestError("prompt", "empty; give the concept to segment, e.g. 'red car'")
    if len(question) > cfg.max_prompt_chars:
        raise RequestError(
            "prompt", f"{len(question)} characters, over the limit of {cfg.max_prompt_chars}"
        )


def check_reference_count(name: str, count: int) -> None:
    """0 to ``MAX_REFERENCES`` references."""
    if count > MAX_REFERENCES:
        raise RequestError(name, f"got {count}; give 0 to {MAX_REFERENCES} references")


class PixelBudget:
    """The decoded pixels one request may still spend (``cfg.max_request_pixels``), taken image
    by image from the declared sizes, before any pixels are decoded."""

    def __init__(self, cfg: PipelineConfig) -> None:
        self.left = cfg.max_request_pixels
        self.limit = cfg.max_request_pixels

    def take(self, name: str, width: int, height: int) -> None:
        if width * height > self.left:
            raise RequestError(
                name,
                f"{width}x{height} takes the request over its limit of {self.limit} decoded "
                "pixels (target and references together); downscale the images",
            )
        self.left -= width * height
