"""Backends for the Triton BLS orchestrator, and the glue every ``triton_repo`` model.py shares.

The orchestrator runs ``conceptseg.pipeline.Pipeline`` unchanged; its backends call the engine
models through BLS. ``pb_utils`` (``triton_python_backend_utils``, importable only inside the
Python backend's stub) is injected by the model.py files: this package never imports it.

Threading: ``Pipeline.run`` is synchronous, so each request runs in a worker thread of the
orchestrator's own pool; each BLS call is an ``InferenceRequest.async_exec()`` scheduled on the
model's event loop. (``async_exec`` itself runs in the loop's default executor, so the pipeline
threads must not: with every default worker waiting on a BLS call, none would be left to make it.) The image
encoder call is only *submitted* by ``encode_image`` (a :class:`PendingImage`), so it runs while
the pipeline goes on to the MLLM whenever no router probe needs the features first.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from conceptseg import contract
from conceptseg.backends.base import Generation, SegOutput
from conceptseg.backends.engines import (
    PAD_BOX_LABEL,
    EngineCtm,
    EngineSam3,
    build_prompt,
    heads_output,
)
from conceptseg.config import PipelineConfig
from conceptseg.masks import logits_to_mask
from conceptseg.textstream import OnText
from conceptseg.types import RequestError, Result

MLLM_INPUTS = ("messages", "images")
MLLM_OUTPUTS = (
    "text",
    "token_ids",
    "hidden",
    "prompt_tokens",
    "stopped",
    "prefill_ms",
    "decode_ms",
)


class EngineError(RuntimeError):
    """An engine model answered a BLS call with an error (the request fails as INTERNAL)."""


# --- model.py glue ------------------------------------------------------------------------------


def model_params(args: dict[str, Any], required: tuple[str, ...]) -> dict[str, str]:
    """The ``parameters`` of a model's config, each required one present and filled."""
    config = json.loads(args["model_config"])
    params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
    for key in required:
        value = params.get(key)
        assert value is not None, (
            f"{config['name']}: parameter {key!r} is missing from config.pbtxt"
        )
        assert "${" not in value, f"{config['name']}: parameter {key}={value!r} was never filled"
    return params


def read_inputs(
    pb_utils: Any, request: Any, names: tuple[str, ...] | list[str]
) -> dict[str, np.ndarray]:
    """The request's tensors among ``names`` as numpy (absent optional inputs are left out)."""
    arrays = {}
    for name in names:
        tensor = pb_utils.get_input_tensor_by_name(request, name)
        if tensor is not None:
            arrays[name] = tensor.as_numpy()
    return arrays


def to_response(pb_utils: Any, arrays: dict[str, np.ndarray]) -> Any:
    return pb_utils.InferenceResponse(
        [pb_utils.Tensor(n, np.asarray(a)) for n, a in arrays.items()]
    )


def error_response(pb_utils: Any, exc: BaseException, logger: Any = None) -> Any:
    """INVALID_ARG for a :class:`RequestError`, INTERNAL (and a log line) for anything else."""
    if isinstance(exc, RequestError):
        return pb_utils.InferenceResponse(
            error=pb_utils.TritonError(str(exc), pb_utils.TritonError.INVALID_ARG)
        )
    if logger is not None:
        logger.log_error(f"request failed: {type(exc).__name__}: {exc}")
    return pb_utils.InferenceResponse(
        error=pb_utils.TritonError(f"internal error: {exc}", pb_utils.TritonError.INTERNAL)
    )


def pipeline_config(params: dict[str, str]) -> PipelineConfig:
    """The ``pipeline_config`` parameter (JSON of PipelineConfig fields) as a config."""
    try:
        return PipelineConfig(**json.loads(params["pipeline_config"]))
    except (TypeError, ValueError) as exc:
        raise AssertionError(f"parameter pipeline_config: {exc}") from None


def serving_versions(engines: Path, params: dict[str, str]) -> dict[str, Any]:
    """What ``Result.versions`` says when served (the in-process keys, plus the profile)."""
    from conceptseg.backends import versions
    from conceptseg.backends.engines import read_manifest

    weights = Path(read_manifest(engines)["weights"])
    return versions(
        weights, backend=f"triton-{params['profile']}", serving="triton", engines=str(engines)
    )


def build_mllm(params: dict[str, str], config: PipelineConfig) -> Any:
    """The ``mllm`` model's backend: ``hf``, ``ort-genai`` or ``trtllm`` on ``mllm_path``.

    The same backends and arguments as ``conceptseg.backends.build_pipeline``; the repository
    tool has already resolved which directory each one loads.
    """
    from conceptseg.backends import build_mllm as build

    prefix_cache = int(params.get("prefix_cache", 4))
    return build(params["mllm_backend"], Path(params["mllm_path"]), config,
                 prefix_cache=prefix_cache, precision=params.get("mllm_precision", "fp32"))  # fmt: skip


def group_by_shape(feeds: list[dict[str, np.ndarray]]) -> list[list[int]]:
    """Indices of requests whose inputs have equal shapes past the batch dim (one run each)."""
    groups: dict[tuple, list[int]] = {}
    for i, feed in enumerate(feeds):
        key = tuple((n, a.dtype.str, a.shape[1:]) for n, a in sorted(feed.items()))
        groups.setdefault(key, []).append(i)
    return list(groups.values())


def run_batched(
    graph: Any, feeds: list[dict[str, np.ndarray]]
) -> list[dict[str, np.ndarray] | Exception]:
    """Run a dynamic batch through ``graph`` one concatenated call per shape group.

    Returns, per request, its outputs (split back by batch rows) or the exception its group hit.
    """
    results: list[dict[str, np.ndarray] | Exception] = [{} for _ in feeds]
    for group in group_by_shape(feeds):
        try:
            batch = {n: np.concatenate([feeds[i][n] for i in group]) for n in feeds[group[0]]}
            out = graph.run(**batch)
            start = 0
            for i in group:
                rows = feeds[i][next(iter(feeds[i]))].shape[0]
                results[i] = {n: a[start : start + rows] for n, a in out.items()}
                start += rows
        except Exception as exc:  # noqa: BLE001 - reported per request by the caller
            for i in group:
                results[i] = exc
    return results


# --- BLS calls ----------------------------------------------------------------------------------


class Bls:
    """Submit BLS calls on the model's event loop from any thread (``loop`` set by execute)."""

    def __init__(self, pb_utils: Any, loop: asyncio.AbstractEventLoop | None) -> None:
        self.pb_utils, self.loop = pb_utils, loop

    def _request(self, model: str, inputs: dict[str, np.ndarray], outputs: tuple[str, ...]) -> Any:
        pb = self.pb_utils
        return pb.InferenceRequest(
            model_name=model,
            inputs=[pb.Tensor(n, np.ascontiguousarray(a)) for n, a in inputs.items()],
            requested_output_names=list(outputs),
        )

    async def _call(
        self, model: str, inputs: dict[str, np.ndarray], outputs: tuple[str, ...]
    ) -> dict[str, np.ndarray]:
        response = await self._request(model, inputs, outputs).async_exec()
        if response.has_error():
            raise EngineError(f"{model}: {response.error().message()}")
        return {n: self.pb_utils.get_output_tensor_by_name(response, n).as_numpy() for n in outputs}

    def submit(
        self, model: str, inputs: dict[str, np.ndarray], outputs: tuple[str, ...]
    ) -> Future[dict[str, np.ndarray]]:
        assert self.loop is not None, "Bls.loop is unset: execute binds the running loop first"
        return asyncio.run_coroutine_threadsafe(self._call(model, inputs, outputs), self.loop)

    def call(
        self, model: str, inputs: dict[str, np.ndarray], outputs: tuple[str, ...]
    ) -> dict[str, np.ndarray]:
        return self.submit(model, inputs, outputs).result()

    async def _open_stream(
        self, model: str, inputs: dict[str, np.ndarray], outputs: tuple[str, ...]
    ) -> Any:
        # resolves at the first response
        return await self._request(model, inputs, outputs).async_exec(decoupled=True)

    def stream(
        self, model: str, inputs: dict[str, np.ndarray], outputs: tuple[str, ...]
    ) -> Iterator[dict[str, np.ndarray]]:
        """The responses of a decoupled model, as they arrive, each as its tensors (the empty
        final-flag response is skipped). Call from a worker thread: the call is opened on the
        model's loop, and the iterator's blocking ``next`` runs here, the GIL released."""
        assert self.loop is not None, "Bls.loop is unset: execute binds the running loop first"
        opened = asyncio.run_coroutine_threadsafe(
            self._open_stream(model, inputs, outputs), self.loop
        )
        for response in opened.result():
            if response.has_error():
                raise EngineError(f"{model}: {response.error().message()}")
            tensors = response.output_tensors()
            if tensors:
                yield {t.name(): t.as_numpy() for t in tensors}


@dataclass
class BlsGraph:
    """An engine model behind the ``run(**feeds)`` call shape of the ONNX Runtime graphs."""

    bls: Bls
    model: str
    outputs: tuple[str, ...]

    def run(self, **feeds: np.ndarray) -> dict[str, np.ndarray]:
        return self.bls.call(self.model, feeds, self.outputs)


class PendingImage:
    """Image features being computed by the ``sam3_vision`` model (resolved on first use)."""

    def __init__(self, future: Future) -> None:
        self.future = future
        self.started, self.finished = time.perf_counter(), 0.0
        future.add_done_callback(self._done)

    def _done(self, _: Future) -> None:
        self.finished = time.perf_counter()

    @property
    def elapsed_ms(self) -> float:
        """Wall time of the vision call, submit to result (0 while it runs)."""
        return max(self.finished - self.started, 0.0) * 1e3

    def fpn(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        out = self.future.result()
        return out["fpn0"], out["fpn1"], out["fpn2"]


def _graph_outputs(engines: Path, name: str) -> tuple[str, ...]:
    manifest = json.loads((Path(engines) / f"{name}.json").read_text())
    return tuple(t["name"] for t in manifest["outputs"])


class TritonSam3(EngineSam3):
    """:class:`SegBackend` on the ``sam3_*`` engine models, shared by all requests (thread-safe)."""

    def __init__(self, engines: Path, bls: Bls) -> None:
        names = ("sam3_vision", "sam3_text", "sam3_heads")
        super().__init__(engines, {n: BlsGraph(bls, n, _graph_outputs(engines, n)) for n in names})
        self.bls = bls
        self._lock = threading.Lock()  # the text cache and the tokenizer are not thread-safe
        heads = _graph_outputs(engines, "sam3_heads")
        self._heads_outputs = {
            True: heads,
            False: tuple(n for n in heads if n != "instance_masks"),  # (K, 4g, 4g): only on demand
        }
        from conceptseg.backends.torch_sam3 import preprocess

        preprocess(Image.new("RGB", (8, 8)), self.side)  # warm-up: the first call costs seconds

    def encode_image(self, image: Image.Image) -> PendingImage:
        from conceptseg.backends.torch_sam3 import preprocess  # Meta's resize, shared with torch

        pixels = preprocess(image, self.side).numpy()
        outputs = ("fpn0", "fpn1", "fpn2")
        return PendingImage(self.bls.submit("sam3_vision", {"image": pixels}, outputs))

    def text_features(self, text: str) -> tuple[np.ndarray, np.ndarray]:
        with self._lock:
            return super().text_features(text)

    def run_heads(
        self, features: PendingImage, text: str, concept: np.ndarray | None, instances: bool = False
    ) -> dict[str, np.ndarray]:
        """The heads model's outputs for one prompt (batch of 1)."""
        prompt, mask = build_prompt(*self.text_features(text), concept, self.q_max)
        fpn0, fpn1, fpn2 = features.fpn()
        feeds = {
            "fpn0": fpn0,
            "fpn1": fpn1,
            "fpn2": fpn2,
            "prompt": prompt[None],
            "prompt_mask": mask[None],
            "boxes": np.zeros((1, 1, 4), np.float32),
            "box_labels": np.full(
                (1, 1), PAD_BOX_LABEL, np.int64
            ),  # one padding box, as in-process
        }
        return self.bls.call("sam3_heads", feeds, self._heads_outputs[instances])

    def segment(
        self, features: PendingImage, text: str, concept: np.ndarray | None = None
    ) -> SegOutput:
        return heads_output(self.run_heads(features, text, concept))


class RequestSeg:
    """One request's view of :class:`TritonSam3`: keeps the last heads outputs (instances)."""

    def __init__(self, sam3: TritonSam3, instances: bool) -> None:
        self.sam3, self.instances, self.last = sam3, instances, None
        self.pending: PendingImage | None = None

    def encode_image(self, image: Image.Image) -> PendingImage:
        self.pending = self.sam3.encode_image(image)
        return self.pending

    def segment(
        self, features: PendingImage, text: str, concept: np.ndarray | None = None
    ) -> SegOutput:
        self.last = self.sam3.run_heads(features, text, concept, self.instances)
        return heads_output(self.last)

    def instance_list(self, size: tuple[int, int], threshold: float) -> list[contract.Instance]:
        """Instances of the last call scoring >= ``threshold``; boxes and masks in ``size`` (W, H)."""
        assert self.last is not None and "instance_masks" in self.last, (
            "segment() with instances first"
        )
        w, h = size
        found = []
        for score, box, logits in zip(
            self.last["instance_scores"][0],
            self.last["instance_boxes"][0],
            self.last["instance_masks"][0],
            strict=True,
        ):
            if score >= threshold:
                x1, y1, x2, y2 = (float(v) for v in np.clip(box, 0, 1) * (w, h, w, h))
                mask = logits_to_mask(logits, (h, w))
                found.append(contract.Instance(float(score), (x1, y1, x2, y2), mask))
        return found


# --- the MLLM model's tensors (generic: messages JSON + images in, text + states out) ----------


def to_mllm_arrays(
    messages: list[dict[str, Any]], images: list[Image.Image]
) -> dict[str, np.ndarray]:
    return {
        "messages": np.array([json.dumps(messages).encode()], dtype=np.object_),
        "images": np.array([contract.encode_image(i) for i in images], dtype=np.object_),
    }


def from_mllm_arrays(
    arrays: dict[str, np.ndarray],
) -> tuple[list[dict[str, Any]], list[Image.Image]]:
    import io

    messages = json.loads(bytes(arrays["messages"].ravel()[0]))
    images = [Image.open(io.BytesIO(bytes(b))).convert("RGB") for b in arrays["images"].ravel()]
    return messages, images


def generation_to_arrays(gen: Generation) -> dict[str, np.ndarray]:
    return {
        "text": np.array([gen.text.encode()], dtype=np.object_),
        "token_ids": np.asarray(gen.token_ids, np.int64).reshape(-1),
        "hidden": np.asarray(gen.hidden, np.float32),
        "prompt_tokens": np.array([gen.prompt_tokens], np.int64),
        "stopped": np.array([gen.stopped], np.bool_),
        "prefill_ms": np.array([gen.prefill_ms], np.float32),
        "decode_ms": np.array([gen.decode_ms], np.float32),
    }


def generation_from_arrays(out: dict[str, np.ndarray]) -> Generation:
    return Generation(
        text=text_of(out),
        token_ids=[int(t) for t in out["token_ids"]],
        hidden=np.asarray(out["hidden"], np.float32),
        prompt_tokens=int(out["prompt_tokens"][0]),
        stopped=bool(out["stopped"][0]),
        prefill_ms=float(out["prefill_ms"][0]),
        decode_ms=float(out["decode_ms"][0]),
    )


def text_of(arrays: dict[str, np.ndarray]) -> str:
    return bytes(np.asarray(arrays["text"]).ravel()[0]).decode("utf-8")


class TritonMllm:
    """:class:`MLLMBackend` calling the (decoupled) ``mllm`` model: with ``on_text`` it asks for
    the text deltas as interim responses; the final response holds the whole generation."""

    def __init__(self, bls: Bls, model: str = "mllm") -> None:
        self.bls, self.model = bls, model

    def generate(
        self,
        messages: list[dict[str, Any]],
        images: list[Image.Image],
        on_text: OnText | None = None,
    ) -> Generation:
        inputs = to_mllm_arrays(messages, images)
        inputs["stream"] = np.array([on_text is not None], np.bool_)
        final = None
        for arrays in self.bls.stream(self.model, inputs, MLLM_OUTPUTS):
            if "token_ids" in arrays:
                final = arrays
            elif on_text is not None and "text" in arrays:
                on_text(text_of(arrays))
        if final is None:
            raise EngineError(f"{self.model}: the response stream ended without the generation")
        return generation_from_arrays(final)


def serve_mllm_request(pb_utils: Any, mllm: Any, request: Any) -> None:
    """The decoupled ``mllm`` model's work for one request: interim ``text`` responses when the
    request's optional ``stream`` input is true, then the generation as the final response (or
    an error response, final too)."""
    sender = request.get_response_sender()
    final = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL
    try:
        arrays = read_inputs(pb_utils, request, (*MLLM_INPUTS, "stream"))
        stream = bool(np.asarray(arrays.pop("stream", [False])).ravel()[0])

        def send_text(delta: str) -> None:
            text = {"text": np.array([delta.encode()], dtype=np.object_)}
            sender.send(to_response(pb_utils, text))

        generation = mllm.generate(*from_mllm_arrays(arrays), on_text=send_text if stream else None)
        sender.send(to_response(pb_utils, generation_to_arrays(generation)), flags=final)
    except Exception as exc:  # noqa: BLE001 - one request fails, the model goes on
        send_final_error(pb_utils, sender, exc)


def send_final_error(pb_utils: Any, sender: Any, exc: BaseException) -> None:
    """The error as a decoupled request's final response; if even that cannot be sent (the
    request was cancelled, or its final response already went), the log says so and the model
    goes on."""
    try:
        sender.send(error_response(pb_utils, exc, pb_utils.Logger),
                    flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)  # fmt: skip
    except Exception as lost:  # noqa: BLE001
        pb_utils.Logger.log_error(f"could not answer a request ({exc!r}): {lost!r}")


# --- the orchestrator ---------------------------------------------------------------------------


class Orchestrator:
    """``run(request, options)``: the in-process pipeline over the engine models."""

    def __init__(
        self,
        engines: Path,
        bls: Bls,
        config: PipelineConfig,
        versions: dict[str, Any],
        workers: int = 8,
    ) -> None:
        self.pool = ThreadPoolExecutor(workers, thread_name_prefix="conceptseg-request")
        self.sam3 = TritonSam3(engines, bls)
        self.mllm = TritonMllm(bls)
        self.ctm = EngineCtm(engines, BlsGraph(bls, "ctm", ("concept",)))
        self.config, self.versions = config, versions

    def run(
        self, request: Any, options: contract.Options, on_text: OnText | None = None
    ) -> tuple[Result, list[contract.Instance]]:
        from conceptseg.pipeline import Pipeline

        seg = RequestSeg(self.sam3, options.instance_masks)
        config = replace(self.config, router=self.config.router and options.router)
        result = Pipeline(seg, self.mllm, self.ctm, config, self.versions).run(request, on_text)
        if seg.pending is not None:
            # the pipeline's "sam3_image" only submits the call: report the engine call's own time
            result.timings_ms["sam3_vision"] = seg.pending.elapsed_ms
        instances = (
            seg.instance_list(request.image.size, options.instance_threshold)
            if options.instance_masks
            else []
        )
        return result, instances

    async def submit(
        self, arrays: dict[str, np.ndarray], on_text: OnText | None = None
    ) -> dict[str, np.ndarray]:
        """:meth:`handle` in a worker thread of this orchestrator's pool."""
        return await asyncio.wrap_future(self.pool.submit(self.handle, arrays, on_text))

    def handle(
        self, arrays: dict[str, np.ndarray], on_text: OnText | None = None
    ) -> dict[str, np.ndarray]:
        """Request tensors -> response tensors (RequestError for a bad request); ``on_text``
        receives the reasoning text in deltas while the MLLM generates."""
        start = time.perf_counter()
        request, options = contract.from_request_arrays(arrays, self.config)
        decoded = time.perf_counter()
        result, instances = self.run(request, options, on_text)
        result.timings_ms["request_decode"] = (decoded - start) * 1e3
        result.timings_ms["total"] = (time.perf_counter() - start) * 1e3
        return contract.to_response_arrays(result, options, instances)
