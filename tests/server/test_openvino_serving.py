"""``conceptseg serve --sam3-precision bf16`` (cpu profile): the ``sam3_vision`` model runs the
image encoder in bf16 under OpenVINO inside the real Triton server, and both routes answer as
the in-process pipeline on ``--backend openvino --sam3-precision bf16`` does (same text, the
mask within 1 pixel in 10,000; see test_server.assert_same for why not bit-equal).

Run: .venv/bin/pytest tests/server/test_openvino_serving.py -q
"""

from __future__ import annotations

from dataclasses import asdict

import pytest

from conceptseg.build import build_pipeline
from conceptseg.client import Client
from conceptseg.config import from_name
from conceptseg.samples import sample_request
from conceptseg.types import Request

CONFIG = from_name("test", max_new_tokens=8)

FAST = "mug"  # one word: the tiny SAM 3's presence passes the fast route's threshold


@pytest.fixture(scope="module")
def served(tiny_engines, serving):
    with serving(tiny_engines, sam3_precision="bf16", pipeline_config=asdict(CONFIG)) as server:
        yield server


def test_both_routes_match_openvino_in_process(served, tiny_weights, tiny_engines):
    reference = build_pipeline(tiny_weights, backend="openvino", engines=tiny_engines,
                               config=CONFIG, sam3_precision="bf16")  # fmt: skip
    sample = sample_request()
    refs = [(r.image, r.box) for r in sample.references]
    with Client(served.cfg.urls["grpc"], protocol="grpc") as client:
        config = client.client.get_model_config("sam3_vision", headers=served.grpc_headers).config
        assert (config.parameters["runtime"].string_value,
                config.parameters["precision"].string_value) == ("openvino", "bf16")  # fmt: skip
        for request, route in ((Request(image=sample.image, question=FAST), "fast"), (sample, "reason")):
            expected = reference.run(request)
            got = client.segment(request.image, request.question, refs if route == "reason" else [])
            assert expected.route == got.result["route"] == route
            assert got.result["text"] == expected.text
            differ = int((got.mask != expected.mask).sum())
            assert differ <= expected.mask.size // 10_000, f"{route}: {differ} mask pixels differ"
