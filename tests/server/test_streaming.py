"""Streaming through the real server (``conceptseg_stream``, gRPC): the reasoning text arrives in
deltas before the final response, the deltas join to the result's text, the final response
equals the one-shot ``conceptseg`` answer, and bad input is refused by name without harm.

Run: .venv/bin/pytest tests/server/test_streaming.py -q
"""

from __future__ import annotations

import asyncio
import json
import time

import numpy as np
import pytest

from conceptseg import contract
from conceptseg.cli import main as cli_main
from conceptseg.client import AsyncClient, Client, ServerError
from conceptseg.samples import sample_request

FAST = "mug"


@pytest.fixture(scope="module")
def grpc(triton):
    with Client(triton.cfg.urls["grpc"], protocol="grpc") as client:
        yield client


@pytest.fixture(scope="module")
def sample():
    return sample_request()


def refs(request):
    return [(r.image, r.box) for r in request.references]


def test_reasoning_text_streams_then_the_same_answer_as_one_shot(grpc, sample):
    arrivals = []
    streamed = grpc.segment_stream(
        sample.image, sample.question, refs(sample), on_text=lambda d: arrivals.append(d)
    )
    one_shot = grpc.segment(sample.image, sample.question, refs(sample))
    assert streamed.result["route"] == "reason" and streamed.result["tokens"] == 8
    assert arrivals, "a reasoning request streams its text"
    assert "".join(arrivals) == streamed.result["text"] == one_shot.result["text"]
    assert (streamed.mask == one_shot.mask).all()
    for key in ("answer", "think", "bbox", "check", "tokens"):
        assert streamed.result[key] == one_shot.result[key], key


def test_deltas_arrive_before_the_final_response(grpc, sample):
    """Stamped inside the callback as each delta arrives: the first one came while the MLLM was
    still generating, so at least the rest of the generation, the CTM and the final SAM 3 call
    (the server's own step timings) separate it from the final response's arrival."""
    stamps = []
    out = grpc.segment_stream(
        sample.image, sample.question, refs(sample),
        on_text=lambda d: stamps.append(time.perf_counter()),
    )  # fmt: skip
    final = time.perf_counter()  # segment_stream returns as the final response is decoded
    steps = out.result["timings_ms"]
    after_first_ms = steps["ctm"] + steps["sam3_segment"]
    assert stamps, "a reasoning request streams its text"
    assert (final - stamps[0]) * 1e3 >= after_first_ms, (
        f"first delta {1e3 * (final - stamps[0]):.1f} ms before the final response, but the "
        f"steps after the generation alone took {after_first_ms:.1f} ms: the text was not streamed"
    )


def test_fast_path_streams_no_text(grpc, sample):
    arrivals = []
    out = grpc.segment_stream(sample.image, FAST, on_text=arrivals.append)
    assert out.result["route"] == "fast" and arrivals == [] and out.result["text"] == ""


def test_bad_input_is_refused_by_name_and_streaming_goes_on(grpc, sample):
    arrays = contract.to_request_arrays(sample.image, FAST, [])
    arrays["prompt"] = np.array([[b" "]], dtype=np.object_)
    with pytest.raises(ServerError) as info:
        grpc.infer_stream(arrays)
    assert info.value.invalid_argument and "prompt: empty" in info.value.message
    arrivals = []
    after = grpc.segment_stream(sample.image, sample.question, refs(sample), on_text=arrivals.append)
    assert after.result["route"] == "reason" and "".join(arrivals) == after.result["text"]


def test_an_engine_down_after_streaming_ends_the_stream_unavailable(triton, grpc, sample):
    # the CTM runs after the text was generated and streamed
    grpc.client.unload_model("ctm", headers=triton.grpc_headers)
    arrivals = []
    try:
        with pytest.raises(ServerError) as info:
            grpc.segment_stream(
                sample.image, sample.question, refs(sample), on_text=arrivals.append
            )
    finally:
        grpc.client.load_model("ctm", headers=triton.grpc_headers)
    # an unloaded engine is "down" (retry later), as while the watchdog reloads a dead one
    assert info.value.unavailable and "the model is down" in info.value.message
    assert "ctm" in info.value.message and arrivals, "the text came before the failure"
    assert (
        grpc.segment_stream(sample.image, sample.question, refs(sample)).result["route"] == "reason"
    )


def test_asyncio_client_streams_and_reports_bad_input(triton, grpc, sample):
    one_shot = grpc.segment(sample.image, sample.question, refs(sample))
    bad = contract.to_request_arrays(sample.image, FAST, [])
    bad["prompt"] = np.array([[b" "]], dtype=np.object_)

    async def run():
        client = AsyncClient(triton.cfg.urls["grpc"], protocol="grpc")
        pieces = []
        try:
            out = await client.segment_stream(
                sample.image, sample.question, refs(sample), on_text=pieces.append
            )
            with pytest.raises(ServerError) as info:
                await client.infer_stream(bad)
            return out, pieces, info.value
        finally:
            await client.close()

    out, pieces, error = asyncio.run(run())
    assert pieces and "".join(pieces) == out.result["text"] == one_shot.result["text"]
    assert (out.mask == one_shot.mask).all()
    assert error.invalid_argument and "prompt: empty" in error.message


def test_http_cannot_stream(triton, sample):
    with Client(triton.cfg.urls["http"], protocol="http") as http:
        with pytest.raises(ValueError, match="streaming needs gRPC"):
            http.segment_stream(sample.image, FAST)

    async def run():
        client = AsyncClient(triton.cfg.urls["http"], protocol="http")
        try:
            await client.segment_stream(sample.image, FAST)
        finally:
            await client.close()

    with pytest.raises(ValueError, match="streaming needs gRPC"):
        asyncio.run(run())


def test_cli_client_stream_prints_the_text_to_stderr(triton, tmp_path, capsys):
    request = sample_request()
    request.image.save(tmp_path / "target.png")
    argv = ["client", "--url", f"grpc://{triton.cfg.urls['grpc']}", "--image",
            str(tmp_path / "target.png"), "--prompt", request.question, "--no-router", "--stream",
            "--out", str(tmp_path / "served")]  # fmt: skip
    assert cli_main(argv) == 0
    streamed = capsys.readouterr().err.removesuffix("\n")
    result = json.loads((tmp_path / "served.json").read_text())
    assert result["route"] == "reason" and streamed and streamed == result["text"]
    argv[argv.index("--url") + 1] = triton.cfg.urls["http"]
    assert cli_main(argv) == 2
    assert "error: --stream: streaming needs gRPC" in capsys.readouterr().err
