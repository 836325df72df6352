"""End to end on the tiny checkpoints with the torch backends. Run: .venv/bin/pytest tests/models/test_pipeline_torch.py -q"""

import numpy as np
import pytest

from conceptseg.build import build_pipeline
from conceptseg.config import PipelineConfig
from conceptseg.pipeline import Pipeline
from conceptseg.samples import sample_request
from conceptseg.types import Request, RequestError


@pytest.fixture(scope="module")
def pipeline(tiny_weights):
    return build_pipeline(tiny_weights, config=PipelineConfig(max_new_tokens=16))


def test_reasoning_path_end_to_end(pipeline):
    request = sample_request()  # 8 words: the probe is skipped, the MLLM runs
    result = pipeline.run(request)
    assert result.route == "reason" and result.presence is None and result.tokens == 16
    assert (
        result.mask.shape == (request.image.height, request.image.width)
        and result.mask.dtype == bool
    )
    assert result.versions["synthetic_weights"] is True
    again = pipeline.run(request)
    assert np.array_equal(result.mask, again.mask) and result.text == again.text


def test_fast_path_end_to_end(pipeline):
    request = sample_request()
    short = Request(request.image, "mug", request.references)
    result = pipeline.run(short)
    # random weights: the presence is whatever it is, but the route must follow the rule
    assert result.presence is not None
    assert result.route == ("fast" if result.presence >= 0.1 else "reason")
    if result.route == "fast":
        assert result.tokens == 0 and "mllm" not in result.timings_ms


def test_fast_path_mask_is_sam3_on_the_question(pipeline):
    """With the probe accepted, the mask is exactly SAM 3's semantic mask for the question."""
    from conceptseg.masks import logits_to_mask

    request = Request(sample_request().image, "mug")
    forced = Pipeline(pipeline.seg, pipeline.mllm, pipeline.ctm, PipelineConfig(max_new_tokens=4))
    probe = pipeline.seg.segment(pipeline.seg.encode_image(request.image), "mug")
    result = forced.run(request)
    if result.route == "fast":
        assert np.array_equal(result.mask, logits_to_mask(probe.semantic_logits, result.mask.shape))
    else:
        assert probe.presence < 0.1


def test_errors_name_the_field(pipeline):
    with pytest.raises(RequestError, match="prompt: empty"):
        pipeline.run(Request(sample_request().image, " "))
