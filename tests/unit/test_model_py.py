"""Every triton_repo model.py, run without Triton: a MagicMock ``triton_python_backend_utils``
with small tensor/response dataclasses. One response per request (decoupled models: interim
responses, then exactly one final one); a bad request is INVALID_ARG, a failing one INTERNAL,
and the rest of the batch still succeeds.

Run: .venv/bin/pytest tests/unit/test_model_py.py -q
"""

import asyncio
import importlib.util
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from unittest.mock import MagicMock

import numpy as np
import pytest

from conceptseg.protocols import Generation
from conceptseg.serving import glue, mllm, mllm_model, orchestrator
from conceptseg.serving.bls import EngineError
from conceptseg.types import RequestError

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
    INTERNAL = 13

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

    def send(self, response=None, flags=0):
        assert not any(f == FINAL for _, f in self.sent), "nothing may follow the final response"
        self.sent.append((response, flags))


@dataclass
class MockRequest:
    tensors: dict
    sender: MockSender = field(default_factory=MockSender)

    def get_response_sender(self):
        return self.sender

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


def streamed(request):
    """(interim text deltas, the final response) a decoupled model sent for ``request``."""
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
    return tmp_path


def test_engine_model_batches_by_shape_and_fails_per_group(pb_utils, doubling_graph):
    model = load("engine")
    model.initialize(args("double", engines=str(doubling_graph), graph="double", threads="1"))
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
        model.initialize(args("double", engines="${engines}", graph="double", threads="1"))


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
    good = mllm.to_mllm_arrays([{"role": "user", "content": "hi"}], [Image.new("RGB", (6, 4))])
    stream = dict(good, stream=np.array([True]))
    bad = mllm.to_mllm_arrays([{"role": "user", "content": "boom"}], [])
    requests = [MockRequest(good), MockRequest(stream), MockRequest(bad)]
    assert model.execute(requests) is None, "decoupled: responses go through the senders"
    texts, final = streamed(requests[0])
    assert texts == [] and final.error is None
    generation = mllm.generation_from_arrays({n: final.output(n) for n in mllm.MLLM_OUTPUTS})
    assert generation.text == "<answer>mug</answer>" and generation.token_ids == [1, 2]
    assert generation.hidden.shape == (2, 4) and generation.stopped and generation.decode_ms == 2.5
    assert fake.calls[0] == ([{"role": "user", "content": "hi"}], [(6, 4)])
    texts, final = streamed(requests[1])
    assert "".join(texts) == generation.text and final.output("token_ids").tolist() == [1, 2]
    texts, final = streamed(requests[2])
    assert texts == [] and final.error.code == MockTritonError.INTERNAL


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
    good = mllm.to_mllm_arrays([{"role": "user", "content": "hi"}], [Image.new("RGB", (6, 4))])
    gone = MockRequest(dict(good, stream=np.array([True])), sender=GoneSender())
    after = MockRequest(good)
    assert model.execute([gone, after]) is None
    pb_utils.Logger.log_error.assert_called()  # the lost request is logged
    texts, final = streamed(after)
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
    def __init__(self, engines, bls, config, versions, workers):
        self.bls, self.pool = bls, MagicMock()

    async def submit(self, arrays, on_text=None):
        return self.handle(arrays, on_text)

    def handle(self, arrays, on_text=None):
        prompt = arrays["prompt"][0, 0]
        if prompt == b"bad":
            raise RequestError("prompt", "empty; give the concept")
        if on_text is not None:
            on_text("thinking about ")
            on_text(prompt.decode())
        if prompt == b"boom":
            raise EngineError("ctm: model 'ctm' is not ready")
        assert self.bls.loop is not None, "execute binds the running loop before the pipeline runs"
        return {
            "mask": np.array([[b"png"]], dtype=object),
            "result": np.array([[prompt]], dtype=object),
        }


def test_orchestrator_one_response_per_request(pb_utils, monkeypatch):
    monkeypatch.setattr(orchestrator, "Orchestrator", FakeOrchestrator)
    monkeypatch.setattr(orchestrator, "serving_versions", lambda engines, params: {})
    model = load("conceptseg")
    model.initialize(args("conceptseg", engines="/e", profile="cpu", pipeline_config="{}"))
    requests = [
        MockRequest({"prompt": np.array([[p]], dtype=object)}) for p in (b"bad", b"boom", b"mug")
    ]
    responses = asyncio.run(model.execute(requests))
    assert len(responses) == 3
    assert errors(responses)[:2] == [
        (MockTritonError.INVALID_ARG, "prompt: empty; give the concept"),
        (MockTritonError.INTERNAL, "internal error: ctm: model 'ctm' is not ready"),
    ]
    assert responses[2].error is None and responses[2].output("result")[0, 0] == b"mug"
    pb_utils.Logger.log_error.assert_called_once()
    model.finalize()
    model.orchestrator.pool.shutdown.assert_called_once()


def test_streaming_orchestrator_sends_deltas_then_one_final_response(pb_utils, monkeypatch):
    monkeypatch.setattr(orchestrator, "Orchestrator", FakeOrchestrator)
    monkeypatch.setattr(orchestrator, "serving_versions", lambda engines, params: {})
    model = load("conceptseg")  # the same model.py serves conceptseg_stream
    params = dict(engines="/e", profile="cpu", pipeline_config="{}")
    model.initialize(args("conceptseg_stream", decoupled=True, **params))
    requests = [
        MockRequest({"prompt": np.array([[p]], dtype=object)}) for p in (b"bad", b"boom", b"mug")
    ]
    assert asyncio.run(model.execute(requests)) is None
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
