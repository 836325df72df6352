"""The ``mllm`` model's side: its backend and scheduler from the config parameters, requests in.

Imports ``conceptseg.build`` (and so a backend's torch / onnxruntime-genai / TensorRT-LLM stack):
only the ``mllm`` model's stub loads this module, never the orchestrator.

A request is either a generation (``messages``, ``images``, optional ``stream`` and
``request_id``) handed to the :class:`~conceptseg.serving.scheduler.Scheduler`, which answers it
from its own thread, or a cancel (``cancel``: the ``request_id`` of a generation), answered at
once with an empty final response; the generation it names ends CANCELLED at its next step.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from conceptseg.build import build_mllm as build
from conceptseg.config import PipelineConfig
from conceptseg.serving.glue import read_inputs, send_final_error, to_response
from conceptseg.serving.mllm import MLLM_INPUTS, from_mllm_arrays, generation_to_arrays
from conceptseg.serving.scheduler import Job, Scheduler
from conceptseg.types import RequestError

# generations at once when the config says 0: hf is the one-at-a-time reference; ort-genai's
# batched CPU steps gain little past 4; TensorRT-LLM's executor is built for 8 (TrtllmMllm)
DEFAULT_SLOTS = {"hf": 1, "ort-genai": 4, "trtllm": 8}


def _text(arrays: dict[str, np.ndarray], name: str) -> str:
    return bytes(np.asarray(arrays[name]).ravel()[0]).decode()


def serve_mllm_request(pb_utils: Any, scheduler: Scheduler, request: Any) -> None:
    """Hand one request to ``scheduler`` (or answer a cancel); returns at once. Interim ``text``
    responses when the optional ``stream`` input is true, then the generation as the final
    response, or an error (final too): UNAVAILABLE at capacity, CANCELLED when cancelled."""
    sender = request.get_response_sender()
    final = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL
    try:
        names = (*MLLM_INPUTS, "stream", "request_id", "cancel")
        # copies: the request's tensors are freed when execute returns
        arrays = {k: np.array(v) for k, v in read_inputs(pb_utils, request, names).items()}
        if "cancel" in arrays:
            scheduler.cancel(_text(arrays, "cancel"))
            sender.send(flags=final)
            return
        for name in MLLM_INPUTS:
            if name not in arrays:
                raise RequestError(name, "required (or give `cancel` with a request id)")
        stream = bool(np.asarray(arrays.pop("stream", [False])).ravel()[0])

        def send_text(delta: str) -> None:
            text = {"text": np.array([delta.encode()], dtype=np.object_)}
            sender.send(to_response(pb_utils, text))

        def send_generation(generation: Any) -> None:
            sender.send(to_response(pb_utils, generation_to_arrays(generation)), flags=final)

        messages, images = from_mllm_arrays(arrays)
        scheduler.submit(
            Job(
                messages,
                images,
                on_done=send_generation,
                on_error=lambda exc: send_final_error(pb_utils, sender, exc),
                on_text=send_text if stream else None,
                request_id=_text(arrays, "request_id") if "request_id" in arrays else "",
                is_cancelled=sender.is_cancelled,
            )
        )
    except Exception as exc:  # noqa: BLE001 - one request fails, the model goes on
        send_final_error(pb_utils, sender, exc)


def build_mllm(params: dict[str, str], config: PipelineConfig) -> Any:
    """The ``mllm`` model's backend: ``hf``, ``ort-genai`` or ``trtllm`` on ``mllm_path``.

    The same backends and arguments as ``conceptseg.backends.build_pipeline``; the repository
    tool has already resolved which directory each one loads.
    """
    prefix_cache = int(params.get("prefix_cache", 4))
    return build(params["mllm_backend"], Path(params["mllm_path"]), config,
                 prefix_cache=prefix_cache, precision=params.get("mllm_precision", "fp32"),
                 prefill_chunk=int(params.get("prefill_chunk", 256)))  # fmt: skip


def build_scheduler(params: dict[str, str], mllm: Any) -> Scheduler:
    """``max_generations`` at once (0: :data:`DEFAULT_SLOTS`; hf: always 1) and
    ``max_queued`` waiting behind them."""
    backend = params["mllm_backend"]
    slots = int(params.get("max_generations", 0)) or DEFAULT_SLOTS[backend]
    if backend == "hf":
        slots = 1  # the exact reference: one generation at a time
    return Scheduler(mllm, slots=slots, queue=int(params.get("max_queued", 8)))
