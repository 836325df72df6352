"""The ``mllm`` model's side: its backend from the config parameters, one request served.

Imports ``conceptseg.build`` (and so a backend's torch / onnxruntime-genai / TensorRT-LLM stack):
only the ``mllm`` model's stub loads this module, never the orchestrator.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from conceptseg.build import build_mllm as build
from conceptseg.config import PipelineConfig
from conceptseg.serving.glue import read_inputs, send_final_error, to_response
from conceptseg.serving.mllm import MLLM_INPUTS, from_mllm_arrays, generation_to_arrays


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


def build_mllm(params: dict[str, str], config: PipelineConfig) -> Any:
    """The ``mllm`` model's backend: ``hf``, ``ort-genai`` or ``trtllm`` on ``mllm_path``.

    The same backends and arguments as ``conceptseg.backends.build_pipeline``; the repository
    tool has already resolved which directory each one loads.
    """
    prefix_cache = int(params.get("prefix_cache", 4))
    return build(params["mllm_backend"], Path(params["mllm_path"]), config,
                 prefix_cache=prefix_cache, precision=params.get("mllm_precision", "fp32"))  # fmt: skip
