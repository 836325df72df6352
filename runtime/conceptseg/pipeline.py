"""The one orchestration of a ConceptSeg-R1 request (METHOD.md section 1), over backend Protocols.

The same code runs in-process (torch or ONNX Runtime backends) and inside the Triton BLS model
(backends that call engine models); only the injected backends differ.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from conceptseg import limits, prompt, router, tags
from conceptseg.config import PipelineConfig
from conceptseg.masks import logits_to_mask
from conceptseg.mosaic import (
    CANVAS,
    TILE,
    from_canvas,
    validate_reference,
)
from conceptseg.protocols import CTMBackend, MLLMBackend, SegBackend, SegOutput
from conceptseg.types import Answer, Box, Instance, Request, Result


def check_request(request: Request, cfg: PipelineConfig) -> None:
    """Raise :class:`RequestError` naming the field for anything the pipeline cannot run on."""
    limits.check_pixels("image", *request.image.size, cfg)
    limits.check_prompt(request.question, cfg)
    limits.check_reference_count("references", len(request.references))
    for i, ref in enumerate(request.references):
        limits.check_pixels(f"references[{i}]", *ref.image.size, cfg)
        validate_reference(ref, i)


def instance_list(out: SegOutput, size_hw: tuple[int, int], threshold: float) -> list[Instance]:
    """SAM 3's instances scoring >= ``threshold``, boxes and masks in target pixels (H, W)."""
    assert out.instance_logits is not None and out.scores is not None and out.boxes is not None, (
        "segment(..., instances=True) first"
    )
    h, w = size_hw
    found = []
    for score, box, logits in zip(out.scores, out.boxes, out.instance_logits, strict=False):
        if score >= threshold:
            x1, y1, x2, y2 = (float(v) for v in np.clip(box, 0, 1) * (w, h, w, h))
            found.append(Instance(float(score), (x1, y1, x2, y2), logits_to_mask(logits, size_hw)))
    return found


@dataclass
class _Clock:
    timings_ms: dict[str, float] = field(default_factory=dict)

    @contextmanager
    def step(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.timings_ms[name] = (
                self.timings_ms.get(name, 0.0) + (time.perf_counter() - start) * 1e3
            )


def _clip_box(box: Box, size: tuple[int, int]) -> Box:
    w, h = size
    x1, y1, x2, y2 = box
    return (min(max(x1, 0.0), w), min(max(y1, 0.0), h), min(max(x2, 0.0), w), min(max(y2, 0.0), h))


def _finite(box: Box | None) -> Box | None:
    return box if box is not None and all(math.isfinite(v) for v in box) else None


class Pipeline:
    """``run(request) -> Result``: router probe, fast path or MLLM + CTM + SAM 3."""

    def __init__(
        self,
        seg: SegBackend,
        mllm: MLLMBackend,
        ctm: CTMBackend,
        config: PipelineConfig | None = None,
        versions: dict[str, Any] | None = None,
    ) -> None:
        self.seg, self.mllm, self.ctm = seg, mllm, ctm
        self.cfg = config or PipelineConfig()
        self.versions = versions or {}

    def run(
        self,
        request: Request,
        on_text: Callable[[str], None] | None = None,
        instances: float | None = None,
    ) -> Result:
        """One request; ``on_text`` receives the MLLM's reasoning text in deltas as it is
        generated (never called on the fast path); ``instances``: a score threshold, to return
        SAM 3's instances of the call that made the mask (``Result.instances``)."""
        cfg, clock = self.cfg, _Clock()
        want = instances is not None
        check_request(request, cfg)
        question = request.question.strip()
        size_hw = (request.image.height, request.image.width)
        threshold = router.threshold(question, strip_parentheticals=cfg.strip_parentheticals)
        # 1) SAM 3 image features of the target: computed once, reused by the probe and step 7
        with clock.step("sam3_image"):
            features = self.seg.encode_image(request.image)
        # 2) router probe on the question (skipped when no score could pass: T >= 1)
        presence = None
        if cfg.router and router.needs_probe(threshold):
            sam_text = router.strip(question) if cfg.strip_parentheticals else question
            with clock.step("router_probe"):
                probe = self.seg.segment(features, sam_text, instances=want)
            presence = probe.presence
            if router.accepts(presence, threshold, inclusive=cfg.inclusive_threshold):
                # 3') fast path: SAM 3's own mask
                with clock.step("postprocess"):
                    mask = logits_to_mask(probe.semantic_logits, size_hw)
                    found = instance_list(probe, size_hw, instances) if want else []
                result = self._result(mask, "fast", presence, threshold, clock, Answer(), "")
                result.instances = found
                return result
        # 3) reference mosaic and the reference prompt; images go in as [mosaic, target]
        with clock.step("prompt"):
            messages, images, mosaic = prompt.mllm_inputs(request, question)
        # 4) MLLM: greedy answer, with the final-norm states of the completion captured on the way
        with clock.step("mllm"):
            generation = self.mllm.generate(messages, images, on_text=on_text)
        clock.timings_ms["mllm_prefill"] = generation.prefill_ms
        clock.timings_ms["mllm_decode"] = generation.decode_ms
        # 5) tags: the answer phrase (SAM 3's text) and the boxes (for clients only)
        answer = tags.parse(generation.text)
        # 6) CTM: completion states -> Q concept tokens
        with clock.step("ctm"):
            # no generated token (prompt already at the length cap): nothing for the CTM to read
            concept = self.ctm(generation.hidden) if len(generation.hidden) else None
        # 7) SAM 3 on the same image features, concept tokens prepended to the answer's text
        with clock.step("sam3_segment"):
            out = self.seg.segment(features, answer.answer, concept, instances=want)
        with clock.step("postprocess"):
            mask = logits_to_mask(out.semantic_logits, size_hw)
            found = instance_list(out, size_hw, instances) if want else []
        result = self._result(mask, "reason", presence, threshold, clock, answer, generation.text)
        result.instances = found
        result.bbox = self._target_box(answer.bbox, request)
        result.check = self._check_box(answer.check, request, mosaic)
        result.tokens = len(generation.token_ids)
        return result

    def _result(
        self,
        mask: np.ndarray,
        route: str,
        presence: float | None,
        threshold: float,
        clock: _Clock,
        answer: Answer,
        text: str,
    ) -> Result:
        return Result(
            mask=mask,
            route=route,
            presence=presence,
            threshold=threshold,
            answer=answer,
            text=text,
            timings_ms=clock.timings_ms,
            versions=self.versions,
        )

    @staticmethod
    def _target_box(box: Box | None, request: Request) -> Box | None:
        """``<bbox>`` is written in the 600x600 target frame: map it back to the original pixels."""
        box = _finite(box)
        if box is None:
            return None
        return _clip_box(from_canvas(box, request.image.size, CANVAS), request.image.size)

    @staticmethod
    def _check_box(box: Box | None, request: Request, mosaic: Any) -> Box | None:
        """``<check>`` locates reference 0's concept in its tile: map it to reference 0's pixels."""
        box = _finite(box)
        if box is None or mosaic is None or mosaic.proxy_box is None:
            return None
        ref_size = request.references[0].image.size
        return _clip_box(from_canvas(box, ref_size, TILE), ref_size)
