"""MLLM model: chat messages JSON + encoded images -> greedy text, token ids, completion states.

The backend (parameter ``mllm_backend``) comes from ``conceptseg.backends.triton.build_mllm``:
``hf`` (transformers) or ``ort-genai`` on cpu, ``trtllm`` (TensorRT-LLM LLM API) on gpu.
"""

import triton_python_backend_utils as pb_utils

from conceptseg.backends import triton as glue


class TritonPythonModel:
    def initialize(self, args):
        required = ("mllm_backend", "mllm_path", "prefix_cache", "pipeline_config")
        params = glue.model_params(args, required)
        self.mllm = glue.build_mllm(params, glue.pipeline_config(params))

    def execute(self, requests):
        responses = []
        for request in requests:
            try:
                arrays = glue.read_inputs(pb_utils, request, glue.MLLM_INPUTS)
                generation = self.mllm.generate(*glue.from_mllm_arrays(arrays))
                responses.append(glue.to_response(pb_utils, glue.generation_to_arrays(generation)))
            except Exception as exc:  # noqa: BLE001 - one request fails, the batch goes on
                responses.append(glue.error_response(pb_utils, exc, pb_utils.Logger))
        assert len(responses) == len(requests)
        return responses
