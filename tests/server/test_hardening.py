"""The real server, closed by default and hostile-input proof: restricted APIs need the key,
the backend's shared memory is private, engine models re-check what clients send them, and
every file of the hostile corpus (``hostile.py``), special-token prompt and odd options JSON is
INVALID_ARG naming the field (or served, for MPO and special tokens), never INTERNAL.

Run: .venv/bin/pytest tests/server/test_hardening.py -q   (one tritonserver, ~1 min on 2 cores)
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request

import hostile
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from PIL import Image
from tritonclient.utils import InferenceServerException

from conceptseg import contract
from conceptseg.client import Client, ServerError
from conceptseg.samples import sample_request
from conceptseg.serving import supervisor
from conceptseg.serving.server import API_KEY_HEADER

FAST = "mug"


@pytest.fixture(scope="module")
def sample():
    return sample_request()


@pytest.fixture(scope="module")
def http(triton):
    with Client(triton.cfg.urls["http"], protocol="http") as client:
        yield client


def call(triton, path: str, method: str = "GET", body: bytes | None = None, key: str = ""):
    """(status, body) of a raw HTTP call, with the API key header when ``key``."""
    headers = {API_KEY_HEADER: key} if key else {}
    data = body if body is not None else (b"" if method == "POST" else None)
    url = f"http://{triton.cfg.urls['http']}{path}"
    request = urllib.request.Request(url, data=data, method=method, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


RESTRICTED_CALLS = [
    ("POST", "/v2/logging", json.dumps({"log_verbose_level": 1}).encode()),
    ("GET", "/v2/logging", None),
    ("GET", "/v2/models/ctm/config", None),
    ("GET", "/v2/models/stats", None),
    ("POST", "/v2/repository/index", None),
    ("POST", "/v2/repository/models/ctm/unload", None),
    ("GET", "/v2/trace/setting", None),
    ("GET", "/v2/systemsharedmemory/status", None),
    (
        "POST",
        "/v2/systemsharedmemory/region/stub/register",
        json.dumps(
            {"key": "/triton_python_backend_shm_region_x", "offset": 0, "byte_size": 64}
        ).encode(),  # fmt: skip
    ),
]


@pytest.mark.parametrize("method,path,body", RESTRICTED_CALLS)
def test_restricted_http_apis_need_the_key(triton, method, path, body):
    status, text = call(triton, path, method, body)
    assert status == 403 and API_KEY_HEADER in text, (path, status, text)


def test_with_the_key_the_restricted_apis_answer_and_health_stays_open(triton):
    assert call(triton, "/v2/models/ctm/config", key=triton.api_key)[0] == 200
    assert call(triton, "/v2/logging", key=triton.api_key)[0] == 200
    assert call(triton, "/v2/logging", key="wrong")[0] == 403
    for path in ("/v2/health/ready", "/v2/health/live", "/v2/models/conceptseg/ready", "/v2"):
        assert call(triton, path)[0] == 200, path


def test_restricted_grpc_apis_need_the_key(triton):
    client = grpcclient.InferenceServerClient(triton.cfg.urls["grpc"])
    try:
        with pytest.raises(InferenceServerException, match="restricted"):
            client.get_model_config("ctm")
        with pytest.raises(InferenceServerException, match="restricted"):
            client.register_system_shared_memory("x", "/triton_python_backend_shm_region_x", 64)
        with pytest.raises(InferenceServerException, match="restricted"):
            client.update_log_settings({"log_verbose_level": 1})
        assert client.get_model_config("ctm", headers=triton.grpc_headers).config.name == "ctm"
        assert client.is_server_ready()
    finally:
        client.close()


def test_backend_shared_memory_is_private_and_named_per_run(triton):
    regions = supervisor.owned_regions(triton.region_prefix)
    stubs = supervisor.list_stubs(triton.process.pid)
    assert len(regions) >= len({s.instance for s in stubs if s.alive}) > 0
    modes = {r.name: oct(r.stat().st_mode & 0o777) for r in regions}
    assert set(modes.values()) == {"0o600"}, modes
    assert all(s.region.startswith(triton.region_prefix) for s in stubs if s.alive)


def pixel_limit(triton) -> int:
    return int(triton.cfg.pipeline_config["max_image_pixels"])


def _refusal(client, arrays):
    with pytest.raises(ServerError) as info:
        client.infer(arrays)
    return info.value


@pytest.mark.parametrize("field", ["image", "ref_images[0]"])
def test_hostile_files_are_invalid_arg_by_name(triton, http, sample, field):
    box = sample.references[0].box
    for kind, (data, says) in hostile.refused(pixel_limit(triton)).items():
        if field == "image":
            arrays = contract.to_request_arrays(data, FAST)
        else:
            arrays = contract.to_request_arrays(sample.image, FAST, [(data, box)])
        error = _refusal(http, arrays)
        assert error.invalid_argument, f"{kind}: {error.status}: {error.message}"
        assert error.message.startswith(f"{field}: ") and says in error.message, (kind, error)
        assert " at 0x" not in error.message, error.message
    assert http.segment(sample.image, FAST).result["route"] == "fast"


def test_request_pixels_are_bounded_across_images(triton, http, sample):
    side = int(pixel_limit(triton) ** 0.5) - 1  # each image alone is within the limit
    big = hostile.encoded(Image.new("RGB", (side, side)), "PNG")
    refs = [(big, (0, 0, 9, 9))] * 2
    error = _refusal(http, contract.to_request_arrays(big, FAST, refs))
    assert error.invalid_argument and error.message.startswith("ref_images[0]: "), error.message
    assert "decoded pixels" in error.message


def test_a_multi_picture_jpeg_is_served(http):
    assert http.segment(hostile.mpo(), FAST).mask.shape == (48, 64)


@pytest.mark.parametrize(
    "token", ["<|image_pad|>", "<|im_end|>", "<|vision_start|>", "<|endoftext|>", "<tool_call>"]
)
def test_special_tokens_in_the_prompt_are_text(http, sample, token):
    refs = [(r.image, r.box) for r in sample.references]
    prompt = f"the mug {token} left of {token}{token}"
    served = http.segment(sample.image, prompt, refs, options=contract.Options(router=False))
    assert served.result["route"] == "reason"


ODD_OPTIONS = {
    "nested too deep": (b"[" * 3000 + b"]" * 3000, "options: "),
    "nested object too deep": (b'{"a":' * 1500 + b"1" + b"}" * 1500, "options: "),
    "huge integer": (b'{"instance_threshold": ' + b"9" * 4000 + b"}", "options.instance_"),
    "too long": (json.dumps({"router": True, "pad": "x" * 10_000}).encode(), "options: over"),
    "version true": (b'{"version": true}', "options.version"),
    "version 1.0": (b'{"version": 1.0}', "options.version"),
    "threshold NaN": (b'{"instance_threshold": NaN}', "options.instance_threshold"),
    "mask format list": (b'{"mask_format": ["png"]}', "options.mask_format"),
    "not utf-8": (b'{"router": "\xff"}', "options"),
}


def test_odd_options_are_invalid_arg_by_name(http, sample):
    for kind, (raw, says) in ODD_OPTIONS.items():
        arrays = contract.to_request_arrays(sample.image, FAST)
        arrays["options"] = np.array([[raw]], dtype=np.object_)
        error = _refusal(http, arrays)
        assert error.invalid_argument and error.message.startswith(says), (kind, error.message)
        assert len(error.message) < 300, (kind, error.message)


ENGINE_CALLS = {
    "ctm hidden too long": (
        "ctm",
        {"hidden": np.zeros((1, 5000, 64), np.float32), "key_mask": np.ones((1, 5000), np.int64)},
        "hidden: seq = 5000 is over the limit",
    ),
    "ctm lengths differ": (
        "ctm",
        {"hidden": np.zeros((1, 128, 64), np.float32), "key_mask": np.ones((1, 64), np.int64)},
        "key_mask: seq = 64 differs",
    ),
    "sam3_vision NaN batch": (
        "sam3_vision",
        {"image": np.full((2, 3, 112, 112), np.nan, np.float32)},
        "image: holds NaN",
    ),
    "sam3_text token id past the vocabulary": (
        "sam3_text",
        {"input_ids": np.full((1, 32), 10**9), "attention_mask": np.ones((1, 32), np.int64)},
        "input_ids: token ids must be in [0, ",
    ),
    "sam3_text mask not 0/1": (
        "sam3_text",
        {"input_ids": np.zeros((1, 32), np.int64), "attention_mask": np.full((1, 32), 7)},
        "attention_mask: a mask holds",
    ),
}


def test_engine_models_recheck_what_clients_send(triton):
    client = grpcclient.InferenceServerClient(triton.cfg.urls["grpc"])
    try:
        for kind, (model, feed, says) in ENGINE_CALLS.items():
            inputs = []
            for name, array in feed.items():
                dtype = "FP32" if array.dtype == np.float32 else "INT64"
                tensor = grpcclient.InferInput(name, list(array.shape), dtype)
                tensor.set_data_from_numpy(
                    array.astype(np.float32 if dtype == "FP32" else np.int64)
                )
                inputs.append(tensor)
            with pytest.raises(InferenceServerException) as info:
                client.infer(model, inputs)
            assert info.value.status() == "StatusCode.INVALID_ARGUMENT", (kind, info.value)
            assert says in info.value.message(), (kind, info.value.message())
    finally:
        client.close()
