"""Every triton_repo model.py, run without Triton: a MagicMock ``triton_python_backend_utils``
with small tensor/response dataclasses. One response per request (decoupled models: interim
responses, then exactly one final one); a bad request is INVALID_ARG, a failing one INTERNAL,
a full server UNAVAILABLE, a cancelled one CANCELLED, and the rest of the batch still succeeds.
The mllm and orchestrator models answer from their own threads: the tests wait for the finals.

Run: .venv/bin/pytest tests/unit/test_model_py.py -q
"""

import importlib.util
import json
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from unittest.mock import MagicMock

import numpy as np
import pytest

from conceptseg.protocols import Generation
from conceptseg.serving import glue, mllm, mllm_model, orchestrator
from conceptseg.serving.bls import EngineError
from conceptseg.types import AtCapacity, Cancelled, RequestError

REPO = Path(__file__).resolve().parents[2] / "triton_repo" / "conceptseg_triton"


@dataclass
class MockTritonTensor:
    name_: str
    array: np.ndarray

    def name(self):
        return self.name_

    def as_numpy(self):
        return self.array


@dataclass
class MockTritonError:
    message_: str
    code: int = 0
    INVALID_ARG = 3
    UNAVAILABLE = 14
    INTERNAL = 13
    CANCELLED = 1

    def message(self):
        return self.message_


@dataclass
class MockResponse:
    output_tensors: list = field(default_factory=list)
    error: MockTritonError | None = None

    def has_error(self):
        return self.error is not None

    def output(self, name):
        return next(t.array for t in self.output_tensors if t.name() == name)


FINAL = 1


@dataclass
class MockSender:
    sent: list = field(default_factory=list)  # (response, flags)
    gone: threading.Event = field(default_factory=threading.Event)  # the client went away

    def send(self, response=None, flags=0):
        assert not any(f == FINAL for _, f in self.sent), "nothing may follow the final response"
        self.sent.append((response, flags))

    def is_cancelled(self):
        return self.gone.is_set()

    def finished(self):
        return any(f == FINAL for _, f in self.sent)


@dataclass
class MockRequest:
    tensors: dict
    sender: MockSender = field(default_factory=MockSender)

    def get_response_sender(self):
        return self.sender

    def timeout(self):
        return 0

    def input(self, name):
        array = self.tensors.get(name)
        return None if array is None else MockTritonTensor(name, array)


@pytest.fixture
def pb_utils(monkeypatch):
    pb = MagicMock()
    pb.Tensor = MockTritonTensor
    pb.TritonError = MockTritonError
    pb.InferenceResponse = MockResponse
    pb.get_input_tensor_by_name = lambda request, name: request.input(name)
    pb.get_output_tensor_by_name = lambda response, name: MockTritonTensor(
        name, response.output(name)
    )
    pb.TRITONSERVER_RESPONSE_COMPLETE_FINAL = FINAL
    pb.using_decoupled_model_transaction_policy = lambda config: bool(
        config.get("model_transaction_policy", {}).get("decoupled")
    )
    monkeypatch.setitem(sys.modules, "triton_python_backend_utils", pb)
    return pb


def load(model):
    spec = importlib.util.spec_from_file_location(f"model_{model}", REPO / model / "1" / "model.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.TritonPythonModel()


def args(name, decoupled=False, **params):
    parameters = {k: {"string_value": v} for k, v in params.items()}
    config = {"name": name, "max_batch_size": 4, "parameters": parameters}
    if decoupled:
        config["model_transaction_policy"] = {"decoupled": True}
    return {"model_config": json.dumps(config)}


def wait_final(*requests, timeout=10):
    """Until each request has its final response (sent from a model's own thread)."""
    end = time.monotonic() + timeout
    while not all(r.sender.finished() for r in requests):
        assert time.monotonic() < end, "a request was never answered"
        time.sleep(0.005)


def streamed(request):
    """(interim text deltas, the final response) a model sent for ``request``."""
    wait_final(request)
    sent = request.sender.sent
    assert [f for _, f in sent] == [0] * (len(sent) - 1) + [FINAL], "one final response, last"
    texts = [bytes(r.output("text").ravel()[0]).decode() for r, _ in sent[:-1]]
    return texts, sent[-1][0]


def errors(responses):
    return [r.error and (r.error.code, r.error.message()) for r in responses]


@pytest.fixture
def doubling_graph(tmp_path):
    """``double.onnx``: y = 2 x for x (batch, n) float32."""
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Add", ["x", "x"], ["y"])],
        "double",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "n"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "n"])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    onnx.save(model, tmp_path / "double.onnx")
    tensor = {"shape": ["batch", "n"], "dtype": "float32"}
    manifest = {"inputs": [{"name": "x"} | tensor], "outputs": [{"name": "y"} | tensor]}
    (tmp_path / "double.json").write_text(json.dumps(manifest))
    return tmp_path


ENGINE_RUNTIMES = [("onnxruntime", "fp32"), ("openvino", "fp32"), ("openvino", "bf16")]


@pytest.mark.parametrize("runtime,precision", ENGINE_RUNTIMES)
def test_engine_model_batches_by_shape_and_fails_per_group(
    pb_utils, doubling_graph, runtime, precision
):
    model = load("engine")
    model.initialize(args("double", engines=str(doubling_graph), graph="double", threads="1",
                          runtime=runtime, precision=precision))  # fmt: skip
    requests = [
        MockRequest({"x": np.ones((1, 3), np.float32)}),
        MockRequest({"x": np.full((2, 5), 3, np.float32)}),
        MockRequest({"x": np.arange(3, dtype=np.float32)[None]}),
        MockRequest({"x": np.ones((1, 3), np.int64)}),  # ORT refuses int64: this one fails alone
    ]
    responses = model.execute(requests)
    assert len(responses) == 4
    assert responses[0].output("y").tolist() == [[2, 2, 2]]
    assert responses[1].output("y").shape == (2, 5) and (responses[1].output("y") == 6).all()
    assert responses[2].output("y").tolist() == [[0, 2, 4]], "rows split back in request order"
    code, message = responses[3].error.code, responses[3].error.message()
    assert code == MockTritonError.INTERNAL and "internal error" in message


def test_unfilled_parameter_is_caught_at_initialize(pb_utils, doubling_graph):
    model = load("engine")
    with pytest.raises(AssertionError, match="never filled"):
        model.initialize(args("double", engines="${engines}", graph="double", threads="1",
                              runtime="onnxruntime", precision="fp32"))  # fmt: skip


class FakeMllm:
    def __init__(self):
        self.calls = []

    def generate(self, messages, images, on_text=None):
        self.calls.append((messages, [i.size for i in images]))
        if messages[0]["content"] == "boom":
            raise RuntimeError("out of memory")
        if on_text is not None:
            for piece in ("<answer>", "mug", "</answer>"):
                on_text(piece)
        return Generation(
            "<answer>mug</answer>", [1, 2], np.ones((2, 4), np.float32), 10, True, 1.5, 2.5
        )


def test_mllm_model_round_trip(pb_utils, monkeypatch):
    from PIL import Image

    fake = FakeMllm()
    monkeypatch.setattr(mllm_model, "build_mllm", lambda params, config: fake)
    model = load("mllm")
    params = dict(mllm_backend="hf", mllm_path="/w", prefix_cache="4", pipeline_config="{}")
    model.initialize(args("mllm", decoupled=True, **params))
    good = mllm.to_mllm_arrays([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "hi"}]}], [Image.new("RGB", (6, 4))])
    stream = dict(good, stream=np.array([True]))
    bad = mllm.to_mllm_arrays([{"role": "user", "content": "boom"}], [])
    requests = [MockRequest(good), MockRequest(stream), MockRequest(bad)]
    assert model.execute(requests) is None, "decoupled: responses go through the senders"
    assert model.scheduler.slots == 1, "hf: the one-at-a-time reference"
    texts, final = streamed(requests[0])
    assert texts == [] and final.error is None
    generation = mllm.generation_from_arrays({n: final.output(n) for n in mllm.MLLM_OUTPUTS})
    assert generation.text == "<answer>mug</answer>" and generation.token_ids == [1, 2]
    assert generation.hidden.shape == (2, 4) and generation.stopped and generation.decode_ms == 2.5
    hi = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "hi"}]}]
    assert fake.calls[0] == (hi, [(6, 4)])
    texts, final = streamed(requests[1])
    assert "".join(texts) == generation.text and final.output("token_ids").tolist() == [1, 2]
    texts, final = streamed(requests[2])
    assert texts == [] and final.error.code == MockTritonError.INTERNAL
    model.finalize()


class SlowMllm(FakeMllm):
    """Streams a delta every 10 ms for 2 s unless its on_text raises (a cancel)."""

    def generate(self, messages, images, on_text=None):
        for _ in range(200):
            time.sleep(0.01)
            on_text("x")
        return super().generate(messages, images)


def test_mllm_model_capacity_and_cancel(pb_utils, monkeypatch):
    from PIL import Image

    monkeypatch.setattr(mllm_model, "build_mllm", lambda params, config: SlowMllm())
    model = load("mllm")
    params = dict(mllm_backend="trtllm", mllm_path="/w", prefix_cache="4", pipeline_config="{}",
                  max_generations="1", max_queued="1")  # fmt: skip
    model.initialize(args("mllm", decoupled=True, **params))
    good = mllm.to_mllm_arrays([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "hi"}]}], [Image.new("RGB", (6, 4))])
    by_id = MockRequest(dict(good, request_id=np.array([b"r1"], dtype=object)))
    by_client = MockRequest(good)
    full = MockRequest(good)
    model.execute([by_id, by_client, full])
    texts, final = streamed(full)
    assert final.error.code == MockTritonError.UNAVAILABLE and "capacity" in final.error.message()
    cancel = MockRequest({"cancel": np.array([b"r1"], dtype=object)})
    start = time.monotonic()
    model.execute([cancel])
    by_client.sender.gone.set()
    texts, final = streamed(cancel)
    assert final is None, "a cancel's answer: an empty final response"
    for request in (by_id, by_client):
        texts, final = streamed(request)
        assert final.error.code == MockTritonError.CANCELLED, final.error
    assert time.monotonic() - start < 1.0, "cancelled at the next delta, not at the end"
    missing = MockRequest({"stream": np.array([True])})
    model.execute([missing])
    texts, final = streamed(missing)
    assert final.error.code == MockTritonError.INVALID_ARG and "messages" in final.error.message()
    model.finalize()


class GoneSender(MockSender):
    """A request whose client went away: every send fails."""

    def send(self, response=None, flags=0):
        raise RuntimeError("Unable to send response: the request was cancelled")


def test_mllm_model_survives_a_request_it_cannot_answer(pb_utils, monkeypatch):
    from PIL import Image

    monkeypatch.setattr(mllm_model, "build_mllm", lambda params, config: FakeMllm())
    model = load("mllm")
    params = dict(mllm_backend="hf", mllm_path="/w", prefix_cache="4", pipeline_config="{}")
    model.initialize(args("mllm", decoupled=True, **params))
    good = mllm.to_mllm_arrays([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "hi"}]}], [Image.new("RGB", (6, 4))])
    gone = MockRequest(dict(good, stream=np.array([True])), sender=GoneSender())
    after = MockRequest(good)
    assert model.execute([gone, after]) is None
    texts, final = streamed(after)
    pb_utils.Logger.log_error.assert_called()  # the lost request is logged
    assert final.error is None and final.output("token_ids").tolist() == [1, 2]


class FakeBls:
    def __init__(self, responses):
        self.responses, self.inputs = responses, None

    def stream(self, model, inputs, outputs):
        self.inputs = inputs
        yield from self.responses


def test_triton_mllm_reads_deltas_then_the_generation():
    gen = Generation("ab", [1, 2], np.ones((2, 4), np.float32), 10, True, 1.0, 2.0)
    final = mllm.generation_to_arrays(gen)
    text = [{"text": np.array([d.encode()], dtype=object)} for d in ("a", "b")]
    bls, pieces = FakeBls([*text, final]), []
    out = mllm.TritonMllm(bls).generate([{"role": "user", "content": "x"}], [], pieces.append)
    assert pieces == ["a", "b"] and out.text == "ab" and out.token_ids == [1, 2]
    assert bls.inputs["stream"].tolist() == [True]
    quiet = FakeBls([final])
    mllm.TritonMllm(quiet).generate([{"role": "user", "content": "x"}], [])
    assert quiet.inputs["stream"].tolist() == [False]
    with pytest.raises(EngineError, match="ended without the generation"):
        mllm.TritonMllm(FakeBls(text)).generate([{"role": "user", "content": "x"}], [])


class FakeOrchestrator:
    def __init__(self, engines, bls, config, versions, max_requests, max_reasoning):
        self.bls, self.closed = bls, False
        self.limits = (max_requests, max_reasoning)

    def start(self, arrays, on_done, on_error, *, on_text=None, is_cancelled=None, timeout_s=0):
        prompt = arrays["prompt"][0, 0]
        if prompt == b"full":
            raise AtCapacity("the server is at capacity (12 requests in flight): retry later")
        threading.Thread(target=self._run, args=(arrays, on_done, on_error, on_text)).start()

    def _run(self, arrays, on_done, on_error, on_text):
        try:
            on_done(self.handle(arrays, on_text))
        except Exception as exc:  # noqa: BLE001
            on_error(exc)

    def handle(self, arrays, on_text=None):
        prompt = arrays["prompt"][0, 0]
        if prompt == b"bad":
            raise RequestError("prompt", "empty; give the concept")
        if on_text is not None:
            on_text("thinking about ")
            on_text(prompt.decode())
        if prompt == b"boom":
            raise EngineError("ctm: model 'ctm' is not ready")
        if prompt == b"gone":
            raise Cancelled("the client went away")
        assert self.bls.loop is not None and self.bls.loop.is_running(), "BLS needs its loop"
        return {
            "mask": np.array([[b"png"]], dtype=object),
            "result": np.array([[prompt]], dtype=object),
        }

    def close(self):
        self.closed = True


ORCHESTRATOR_PARAMS = dict(engines="/e", profile="cpu", pipeline_config="{}", max_requests="12",
                           max_reasoning="8")  # fmt: skip


def test_orchestrator_one_response_per_request(pb_utils, monkeypatch):
    monkeypatch.setattr(orchestrator, "Orchestrator", FakeOrchestrator)
    monkeypatch.setattr(orchestrator, "serving_versions", lambda engines, params: {})
    model = load("conceptseg")
    model.initialize(args("conceptseg", **ORCHESTRATOR_PARAMS))
    assert model.orchestrator.limits == (12, 8)
    prompts = (b"bad", b"boom", b"full", b"gone", b"mug")
    requests = [MockRequest({"prompt": np.array([[p]], dtype=object)}) for p in prompts]
    assert model.execute(requests) is None, "answered from the orchestrator's threads"
    wait_final(*requests)
    for request in requests:
        assert len(request.sender.sent) == 1, "default mode: exactly one response, final"
    responses = [r.sender.sent[0][0] for r in requests]
    assert errors(responses)[:4] == [
        (MockTritonError.INVALID_ARG, "prompt: empty; give the concept"),
        (MockTritonError.INTERNAL, "internal error: ctm: model 'ctm' is not ready"),
        (
            MockTritonError.UNAVAILABLE,
            "the server is at capacity (12 requests in flight): retry later",
        ),
        (MockTritonError.CANCELLED, "cancelled: the client went away"),
    ]
    assert responses[4].error is None and responses[4].output("result")[0, 0] == b"mug"
    pb_utils.Logger.log_error.assert_called_once()  # INTERNAL only
    model.finalize()
    assert model.orchestrator.closed


def test_streaming_orchestrator_sends_deltas_then_one_final_response(pb_utils, monkeypatch):
    monkeypatch.setattr(orchestrator, "Orchestrator", FakeOrchestrator)
    monkeypatch.setattr(orchestrator, "serving_versions", lambda engines, params: {})
    model = load("conceptseg")  # the same model.py serves conceptseg_stream
    model.initialize(args("conceptseg_stream", decoupled=True, **ORCHESTRATOR_PARAMS))
    requests = [
        MockRequest({"prompt": np.array([[p]], dtype=object)}) for p in (b"bad", b"boom", b"mug")
    ]
    assert model.execute(requests) is None
    texts, final = streamed(requests[0])
    assert texts == [] and final.error.code == MockTritonError.INVALID_ARG
    texts, final = streamed(requests[1])  # failed after streaming: the error is the final response
    assert texts == ["thinking about ", "boom"] and final.error.code == MockTritonError.INTERNAL
    texts, final = streamed(requests[2])
    assert texts == ["thinking about ", "mug"] and final.output("result")[0, 0] == b"mug"


def test_group_by_shape_and_run_batched():
    feeds = [{"a": np.zeros((1, 2))}, {"a": np.zeros((1, 3))}, {"a": np.ones((1, 2))}]
    assert glue.group_by_shape(feeds) == [[0, 2], [1]]

    class Sum:
        calls = 0

        def run(self, a):
            Sum.calls += 1
            return {"s": a.sum(axis=1)}

    out = glue.run_batched(Sum(), feeds)
    assert Sum.calls == 2 and [o["s"].tolist() for o in out] == [[0.0], [0.0], [2.0]]
