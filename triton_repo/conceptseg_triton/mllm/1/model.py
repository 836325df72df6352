"""MLLM model (decoupled): chat messages JSON + encoded images -> greedy text, token ids,
completion states. With the optional ``stream`` input true, interim responses carry the text in
deltas while it is generated; the final response always carries the whole generation.

The backend (parameter ``mllm_backend``) comes from ``conceptseg.serving.mllm_model.build_mllm``:
``hf`` (transformers) or ``ort-genai`` on cpu, ``trtllm`` (TensorRT-LLM LLM API) on gpu.
"""

import triton_python_backend_utils as pb_utils

from conceptseg.serving import glue, mllm_model


class TritonPythonModel:
    def initialize(self, args):
        required = ("mllm_backend", "mllm_path", "prefix_cache", "pipeline_config")
        params = glue.model_params(args, required)
        self.mllm = mllm_model.build_mllm(params, glue.pipeline_config(params))

    def execute(self, requests):
        for request in requests:  # one at a time: the backend holds one model and its caches
            mllm_model.serve_mllm_request(pb_utils, self.mllm, request)
        return None  # decoupled: every response went through the request's sender
