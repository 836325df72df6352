"""MLLM model (decoupled): chat messages JSON + encoded images -> greedy text, token ids,
completion states. With the optional ``stream`` input true, interim responses carry the text in
deltas while it is generated; the final response always carries the whole generation.

The backend (parameter ``mllm_backend``) comes from ``conceptseg.serving.mllm_model.build_mllm``:
``hf`` (transformers) or ``ort-genai`` on cpu, ``trtllm`` (TensorRT-LLM LLM API) on gpu.
``execute`` hands each request to the scheduler and returns: up to ``max_generations`` run at
once (continuous batching), ``max_queued`` wait, the rest get UNAVAILABLE; a ``cancel`` request
(or the client going away) ends a generation at its next step with CANCELLED.
"""

import triton_python_backend_utils as pb_utils

from conceptseg.serving import glue, mllm_model


class TritonPythonModel:
    def initialize(self, args):
        required = ("mllm_backend", "mllm_path", "prefix_cache", "pipeline_config")
        params = glue.model_params(args, required)
        mllm = mllm_model.build_mllm(params, glue.pipeline_config(params))
        self.scheduler = mllm_model.build_scheduler(params, mllm)

    def execute(self, requests):
        for request in requests:
            mllm_model.serve_mllm_request(pb_utils, self.scheduler, request)
        return None  # decoupled: every response goes through the request's sender

    def finalize(self):
        self.scheduler.close()
