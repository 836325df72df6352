"""The orchestration with fakes: a scripted-tag MLLM and a fixed-mask segmenter.

Run: .venv/bin/pytest tests/unit/test_pipeline.py -q
"""

import numpy as np
import pytest
from PIL import Image

from conceptseg.config import PipelineConfig
from conceptseg.pipeline import Pipeline
from conceptseg.protocols import Generation, SegOutput
from conceptseg.types import Reference, Request, RequestError

SCRIPT = "<think>t</think> <rule>r</rule><check>[30, 60, 150, 120]</check> <bbox>[300, 150, 600, 450]</bbox> <answer>the mug</answer>"


class ScriptedMllm:
    def __init__(self, text=SCRIPT):
        self.text, self.calls = text, []

    def generate(self, messages, images, on_text=None):
        self.calls.append((messages, images))
        if on_text is not None:  # the text in three pieces, as a streaming backend sends it
            third = len(self.text) // 3
            for piece in (self.text[:third], self.text[third : 2 * third], self.text[2 * third :]):
                on_text(piece)
        return Generation(self.text, [1, 2, 3], np.ones((3, 8), np.float32), 100, True)


class FixedSeg:
    """Probe logits: left half on; reasoning logits: right half on."""

    def __init__(self, presence):
        self.presence, self.encoded, self.prompts = presence, 0, []

    def encode_image(self, image):
        self.encoded += 1
        return ("features", image.size)

    def segment(self, features, text, concept=None, instances=False):
        assert features[0] == "features"
        self.prompts.append((text, None if concept is None else concept.shape))
        logits = -np.ones((8, 8), np.float32)
        if concept is None:
            logits[:, :4] = 1
        else:
            logits[:, 4:] = 1
        return SegOutput(presence=self.presence, semantic_logits=logits)


def ctm(hidden):
    assert hidden.shape == (3, 8)
    return np.zeros((4, 256), np.float32)


def _request(question="mug", n_refs=2, size=(800, 400)):
    refs = tuple(
        Reference(Image.new("RGB", (300, 200)), box=(0, 0, 150, 100)) for _ in range(n_refs)
    )
    return Request(image=Image.new("RGB", size), question=question, references=refs)


def test_fast_path_when_probe_is_confident():
    seg, mllm = FixedSeg(presence=0.5), ScriptedMllm()
    result = Pipeline(seg, mllm, ctm).run(_request("mug"))
    assert (
        result.route == "fast" and result.presence == 0.5 and result.threshold == pytest.approx(0.1)
    )
    assert mllm.calls == [], "the fast path must not run the MLLM"
    assert (
        result.mask.shape == (400, 800)
        and result.mask[:, :400].all()
        and not result.mask[:, 400:].any()
    )
    assert seg.encoded == 1


def test_reason_path_reuses_image_features():
    seg, mllm = FixedSeg(presence=0.05), ScriptedMllm()
    result = Pipeline(seg, mllm, ctm).run(_request("red mug"))
    assert result.route == "reason" and result.answer.answer == "the mug"
    assert seg.encoded == 1, "image features must be computed once per request"
    assert seg.prompts == [("red mug", None), ("the mug", (4, 256))]
    messages, images = mllm.calls[0]
    assert [im.size for im in images] == [(600, 600), (600, 600)]
    assert result.mask[:, 400:].all() and not result.mask[:, :400].any()
    # <bbox> is in the 600x600 target: x * 800/600, y * 400/600
    assert result.bbox == pytest.approx((400.0, 100.0, 800.0, 300.0))
    # <check> is in tile 0 (300x300) of the mosaic: mapped to reference 0 (300x200)
    assert result.check == pytest.approx((30.0, 40.0, 150.0, 80.0))
    assert {"sam3_image", "router_probe", "mllm", "ctm", "sam3_segment"} <= set(result.timings_ms)


def test_long_question_skips_probe():
    seg = FixedSeg(presence=1.0)
    result = Pipeline(seg, ScriptedMllm(), ctm).run(_request("the big red coffee mug"))
    assert result.route == "reason" and result.presence is None
    assert [p[0] for p in seg.prompts] == ["the mug"]


def test_router_off_and_strict_threshold():
    seg = FixedSeg(presence=0.2)
    assert (
        Pipeline(seg, ScriptedMllm(), ctm, PipelineConfig(router=False)).run(_request("mug")).route
        == "reason"
    )
    strict = PipelineConfig(inclusive_threshold=False)
    assert (
        Pipeline(FixedSeg(0.2), ScriptedMllm(), ctm, strict).run(_request("red mug")).route
        == "reason"
    )
    assert Pipeline(FixedSeg(0.2), ScriptedMllm(), ctm).run(_request("red mug")).route == "fast"


def test_parentheticals_removed_for_sam_text():
    seg = FixedSeg(presence=0.0)
    Pipeline(seg, ScriptedMllm(), ctm).run(_request("mug (ceramic)"))
    assert seg.prompts[0][0] == "mug"


def test_no_reference_uses_target_only():
    mllm = ScriptedMllm()
    result = Pipeline(FixedSeg(0.0), mllm, ctm).run(_request("mug", n_refs=0))
    assert len(mllm.calls[0][1]) == 1 and result.check is None


def test_cut_off_generation_still_segments():
    mllm = ScriptedMllm("<think>never finished")
    seg = FixedSeg(presence=0.0)
    result = Pipeline(seg, mllm, ctm).run(_request("mug"))
    assert result.answer.answer == "" and not result.answer.complete and result.bbox is None
    assert seg.prompts[-1] == ("", (4, 256))


@pytest.mark.parametrize(
    "request_, match",
    [
        (Request(Image.new("RGB", (0, 0)), "mug"), "image: zero-size"),
        (Request(Image.new("RGB", (10, 10)), "  "), "prompt: empty"),
        (Request(Image.new("RGB", (10, 10)), "x" * 1001), "prompt: 1001 characters"),
        (_request(n_refs=5), "references: got 5"),
        (
            Request(
                Image.new("RGB", (10, 10)),
                "mug",
                (Reference(Image.new("RGB", (9, 9)), box=(0, 0, 20, 5)),),
            ),
            r"references\[0\]: box",
        ),
    ],
)
def test_bad_requests(request_, match):
    with pytest.raises(RequestError, match=match):
        Pipeline(FixedSeg(0.0), ScriptedMllm(), ctm).run(request_)


def test_reasoning_text_is_streamed_and_the_fast_path_streams_nothing():
    pieces = []
    result = Pipeline(FixedSeg(presence=0.0), ScriptedMllm(), ctm).run(_request(), pieces.append)
    assert result.route == "reason" and len(pieces) == 3 and "".join(pieces) == result.text
    pieces.clear()
    result = Pipeline(FixedSeg(presence=0.99), ScriptedMllm(), ctm).run(_request(), pieces.append)
    assert result.route == "fast" and pieces == []
