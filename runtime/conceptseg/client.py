"""Client of the ``conceptseg`` Triton model: HTTP or gRPC, sync (:class:`Client`) or asyncio
(:class:`AsyncClient`). Tensors follow ``conceptseg.contract`` (version 1).

    from conceptseg.client import Client
    with Client("127.0.0.1:8001", protocol="grpc") as client:
        response = client.segment(open("target.jpg", "rb").read(), "red mug",
                                  references=[(open("ref.jpg", "rb").read(), (10, 20, 200, 240))])
    response.mask  # bool (H, W); response.result: the result JSON (answer, bbox, timings_ms ...)

A refused request raises :class:`ServerError` with Triton's status (``INVALID_ARG``: a bad
request; the message names the field) and the server's message; ``UNAVAILABLE``
(``ServerError.unavailable``): the server is at capacity or its queue is full, retry later.

Streaming (gRPC only; the ``conceptseg_stream`` model): ``Client.segment_stream(..., on_text=f)``
(and ``await AsyncClient.segment_stream(...)``) calls ``f`` with the reasoning text in deltas
while the MLLM generates, then returns the same :class:`~conceptseg.contract.Response` as
``segment``.
"""

from __future__ import annotations

import queue
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from PIL import Image

from conceptseg import contract
from conceptseg.types import Box

MODEL = "conceptseg"
PROTOCOLS = ("http", "grpc")
# UNAVAILABLE answers (the server's AtCapacity and EngineDown; Triton's queue full / timeout)
BUSY_MESSAGES = (
    "at capacity",
    "the model is down",
    "Exceeds maximum queue size",
    "Request timeout expired",
)


class ServerError(RuntimeError):
    """The server refused or failed a request: ``status`` is Triton's, ``message`` its text."""

    def __init__(self, status: str, message: str) -> None:
        super().__init__(message)
        self.status, self.message = status, message

    @property
    def invalid_argument(self) -> bool:
        return self.status in ("400", "StatusCode.INVALID_ARGUMENT", "INVALID_ARG")

    @property
    def unavailable(self) -> bool:
        """At capacity, queue full or queue timeout: nothing ran; retry later, with backoff."""
        return self.status in ("503", "StatusCode.UNAVAILABLE", "UNAVAILABLE")

    def __str__(self) -> str:
        if self.unavailable:
            return f"the server is busy, retry later ({self.status}): {self.message}"
        return self.message


def split_url(url: str, protocol: str | None = None) -> tuple[str, str]:
    """``[http://|grpc://]HOST:PORT`` -> (protocol, HOST:PORT); no scheme means ``protocol`` or http."""
    for scheme in PROTOCOLS:
        if url.startswith(f"{scheme}://"):
            return scheme, url[len(scheme) + 3 :]
    protocol = protocol or "http"
    assert protocol in PROTOCOLS, f"protocol {protocol!r} is not one of {PROTOCOLS}"
    return protocol, url


def _module(protocol: str, aio: bool) -> Any:
    if protocol == "grpc":
        import tritonclient.grpc as grpc_mod  # optional: tritonclient, the serve extra
        import tritonclient.grpc.aio as grpc_aio  # optional: tritonclient, the serve extra

        return grpc_aio if aio else grpc_mod
    import tritonclient.http as http_mod  # optional: tritonclient, the serve extra
    import tritonclient.http.aio as http_aio  # optional: tritonclient, the serve extra

    return http_aio if aio else http_mod


def _inputs(module: Any, arrays: dict[str, np.ndarray]) -> list[Any]:
    from tritonclient.utils import np_to_triton_dtype  # optional: tritonclient, the serve extra

    inputs = []
    for name, array in arrays.items():
        tensor = module.InferInput(name, list(array.shape), np_to_triton_dtype(array.dtype))
        tensor.set_data_from_numpy(array)
        inputs.append(tensor)
    return inputs


def _outputs(module: Any, instance_masks: bool) -> list[Any]:
    names = ["mask", "result"] + (["instance_masks"] if instance_masks else [])
    return [module.InferRequestedOutput(n) for n in names]


def _status(exc: Exception) -> str:
    status = getattr(exc, "status", None)
    return str(status() if callable(status) else status)


def _stream_status(exc: Exception) -> str:
    """A response error on a gRPC stream carries only its message (``ModelStreamInferResponse``
    has no status): per the contract, the server's INTERNAL messages start with "internal error:"
    and every other refusal is a bad request."""
    status = _status(exc)
    if status not in ("None", ""):
        return status  # the stream itself failed (e.g. StatusCode.UNAVAILABLE)
    message = _message(exc)
    if any(m in message for m in BUSY_MESSAGES):
        return "UNAVAILABLE"
    return "INTERNAL" if message.startswith("internal error:") else "INVALID_ARG"


def _message(exc: Exception) -> str:
    message = getattr(exc, "message", None)
    return str(message() if callable(message) else exc)


def _request(
    image: Image.Image | bytes,
    prompt: str,
    references: Sequence[tuple[Image.Image | bytes, Box]],
    options: contract.Options,
) -> dict[str, np.ndarray]:
    return contract.to_request_arrays(image, prompt, list(references), options)


def _infer_kwargs(client: Any, arrays: dict[str, np.ndarray], instance_masks: bool) -> dict:
    """``infer`` arguments shared by the sync and asyncio clients: gRPC's deadline
    (``client_timeout``), HTTP's ``timeout`` parameter (µs; the server cancels the request then:
    Triton 2.51 does not notice a dropped HTTP connection while the request runs)."""
    if client.protocol == "grpc":
        kwargs: dict[str, Any] = {"client_timeout": client.timeout_s}
    else:
        kwargs = {"timeout": int(client.timeout_s * 1e6)}
    return {
        "model_name": MODEL,
        "inputs": _inputs(client.module, arrays),
        "outputs": _outputs(client.module, instance_masks),
        **kwargs,
    }


def _response(result: Any, instance_masks: bool) -> contract.Response:
    names = ["mask", "result"] + (["instance_masks"] if instance_masks else [])
    return contract.from_response_arrays({n: result.as_numpy(n) for n in names})


def _check_streaming(client: Any) -> None:
    if client.protocol != "grpc":
        raise ValueError(
            f"streaming needs gRPC (Triton's HTTP infer has no stream); got {client.url!r} over"
            " http: pass grpc://HOST:PORT (the server's --grpc-port)"
        )


def _stream_event(
    result: Any, error: Any, instance_masks: bool, on_text: Callable[[str], None] | None
) -> contract.Response | None:
    """One message of a ``conceptseg_stream`` stream: the final response, or None after passing
    an interim text delta to ``on_text``; an error raises :class:`ServerError`."""
    if error is not None:
        raise ServerError(_stream_status(error), _message(error))
    if result.as_numpy("result") is not None:
        return _response(result, instance_masks)
    text = result.as_numpy("text")
    if on_text is not None and text is not None:
        on_text(bytes(text.ravel()[0]).decode("utf-8"))
    return None


class Client:
    """Blocking client; one connection, reusable for many requests."""

    def __init__(self, url: str, protocol: str | None = None, timeout_s: float = 600.0) -> None:
        self.protocol, self.url = split_url(url, protocol)
        self.module = _module(self.protocol, aio=False)
        kwargs = (
            {"network_timeout": timeout_s, "connection_timeout": timeout_s}
            if self.protocol == "http"
            else {}
        )
        self.client = self.module.InferenceServerClient(self.url, **kwargs)
        self.timeout_s = timeout_s

    def ready(self) -> bool:
        try:
            return bool(self.client.is_model_ready(MODEL))
        except Exception:  # noqa: BLE001 - not reachable is "not ready"
            return False

    def infer(
        self, arrays: dict[str, np.ndarray], instance_masks: bool = False
    ) -> contract.Response:
        """Send request tensors as they are (no checks here: the server validates)."""
        from tritonclient.utils import (
            InferenceServerException,  # optional: tritonclient, the serve extra
        )

        try:
            result = self.client.infer(**_infer_kwargs(self, arrays, instance_masks))
        except InferenceServerException as exc:
            raise ServerError(_status(exc), _message(exc)) from None
        return _response(result, instance_masks)

    def segment(
        self,
        image: Image.Image | bytes,
        prompt: str,
        references: Sequence[tuple[Image.Image | bytes, Box]] = (),
        options: contract.Options | None = None,
    ) -> contract.Response:
        """Segment ``prompt`` in ``image`` (PIL or encoded PNG/JPEG bytes), with 0-4 references."""
        options = options or contract.Options()
        return self.infer(_request(image, prompt, references, options), options.instance_masks)

    def segment_stream(
        self,
        image: Image.Image | bytes,
        prompt: str,
        references: Sequence[tuple[Image.Image | bytes, Box]] = (),
        options: contract.Options | None = None,
        on_text: Callable[[str], None] | None = None,
    ) -> contract.Response:
        """:meth:`segment` through ``conceptseg_stream``: ``on_text`` receives the reasoning text
        in deltas as it is generated (nothing on the fast path). gRPC only."""
        options = options or contract.Options()
        return self.infer_stream(
            _request(image, prompt, references, options), options.instance_masks, on_text
        )

    def infer_stream(
        self,
        arrays: dict[str, np.ndarray],
        instance_masks: bool = False,
        on_text: Callable[[str], None] | None = None,
    ) -> contract.Response:
        """Send request tensors to ``conceptseg_stream``; deltas to ``on_text``, then the response."""
        _check_streaming(self)
        events: queue.Queue = queue.Queue()
        self.client.start_stream(callback=lambda result, error: events.put((result, error)))
        try:
            self.client.async_stream_infer(
                model_name=contract.STREAM_MODEL, inputs=_inputs(self.module, arrays)
            )
            while True:
                result, error = events.get(timeout=self.timeout_s)
                response = _stream_event(result, error, instance_masks, on_text)
                if response is not None:
                    return response
        except queue.Empty:
            raise ServerError(
                "DEADLINE_EXCEEDED",
                f"no response from {contract.STREAM_MODEL} in {self.timeout_s} s",
            ) from None
        finally:
            self.client.stop_stream(cancel_requests=True)

    def close(self) -> None:
        self.client.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncClient:
    """asyncio client (``tritonclient.{http,grpc}.aio``): ``await client.segment(...)``."""

    def __init__(self, url: str, protocol: str | None = None, timeout_s: float = 600.0) -> None:
        self.protocol, self.url = split_url(url, protocol)
        self.module = _module(self.protocol, aio=True)
        kwargs = {"conn_timeout": timeout_s} if self.protocol == "http" else {}
        self.client = self.module.InferenceServerClient(self.url, **kwargs)
        self.timeout_s = timeout_s

    async def infer(
        self, arrays: dict[str, np.ndarray], instance_masks: bool = False
    ) -> contract.Response:
        from tritonclient.utils import (
            InferenceServerException,  # optional: tritonclient, the serve extra
        )

        try:
            result = await self.client.infer(**_infer_kwargs(self, arrays, instance_masks))
        except InferenceServerException as exc:
            raise ServerError(_status(exc), _message(exc)) from None
        return _response(result, instance_masks)

    async def segment(
        self,
        image: Image.Image | bytes,
        prompt: str,
        references: Sequence[tuple[Image.Image | bytes, Box]] = (),
        options: contract.Options | None = None,
    ) -> contract.Response:
        options = options or contract.Options()
        return await self.infer(
            _request(image, prompt, references, options), options.instance_masks
        )

    async def segment_stream(
        self,
        image: Image.Image | bytes,
        prompt: str,
        references: Sequence[tuple[Image.Image | bytes, Box]] = (),
        options: contract.Options | None = None,
        on_text: Callable[[str], None] | None = None,
    ) -> contract.Response:
        """:meth:`Client.segment_stream` for asyncio (gRPC only)."""
        options = options or contract.Options()
        return await self.infer_stream(
            _request(image, prompt, references, options), options.instance_masks, on_text
        )

    async def infer_stream(
        self,
        arrays: dict[str, np.ndarray],
        instance_masks: bool = False,
        on_text: Callable[[str], None] | None = None,
    ) -> contract.Response:
        _check_streaming(self)

        async def one_request() -> Any:
            yield {"model_name": contract.STREAM_MODEL, "inputs": _inputs(self.module, arrays)}

        stream = self.client.stream_infer(one_request(), stream_timeout=self.timeout_s)
        async for result, error in stream:
            response = _stream_event(result, error, instance_masks, on_text)
            if response is not None:
                return response
        raise ServerError(
            "UNAVAILABLE", f"{contract.STREAM_MODEL}: the stream ended without a response"
        )

    async def close(self) -> None:
        await self.client.close()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
