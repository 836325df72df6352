"""The orchestrator: ``conceptseg.pipeline`` over the engine models, through BLS.

Serves two models from one file: ``conceptseg`` (one response per request) and, when its config
is decoupled, ``conceptseg_stream`` (interim ``text`` responses with the reasoning text as it is
generated, then the final response). ``execute`` hands each request to the orchestrator and
returns at once; the request's response sender answers it from its pool thread (Python backend
>= 24.06 allows this in default mode too), so the instance takes the next batch while reasoning
requests run. BLS calls are ``async_exec`` on a loop of this model's own. Bad requests come back
as INVALID_ARG naming the field, a full server as UNAVAILABLE, a client gone as CANCELLED,
anything else as INTERNAL for that request only.
"""

import json
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils

from conceptseg import contract
from conceptseg.serving import glue
from conceptseg.serving.bls import Bls, background_loop
from conceptseg.serving.orchestrator import Orchestrator, serving_versions


class TritonPythonModel:
    def initialize(self, args):
        required = ("engines", "profile", "pipeline_config", "max_requests", "max_reasoning")
        params = glue.model_params(args, required)
        engines = Path(params["engines"])
        config = json.loads(args["model_config"])
        self.decoupled = pb_utils.using_decoupled_model_transaction_policy(config)
        self.bls = Bls(pb_utils, loop=background_loop())
        self.orchestrator = Orchestrator(
            engines,
            self.bls,
            glue.pipeline_config(params),
            serving_versions(engines, params),
            max_requests=int(params["max_requests"]),
            max_reasoning=int(params["max_reasoning"]),
        )

    def execute(self, requests):
        for request in requests:
            self._start(request)
        return None  # every response goes through its request's sender

    def _start(self, request):
        sender = request.get_response_sender()
        final = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL

        def send_text(delta):
            sender.send(glue.to_response(pb_utils, contract.text_delta_arrays(delta)))

        def send_out(out):
            sender.send(glue.to_response(pb_utils, out), flags=final)

        try:
            # copies: the request's tensors are freed when execute returns
            inputs = glue.read_inputs(pb_utils, request, list(contract.INPUTS))
            arrays = {name: np.array(a) for name, a in inputs.items()}
            self.orchestrator.start(
                arrays,
                send_out,
                lambda exc: glue.send_final_error(pb_utils, sender, exc),
                on_text=send_text if self.decoupled else None,
                is_cancelled=sender.is_cancelled,
                timeout_s=request.timeout() / 1e6,  # the request's "timeout" parameter (µs)
            )
        except Exception as exc:  # noqa: BLE001 - one request fails, the batch goes on
            glue.send_final_error(pb_utils, sender, exc)

    def finalize(self):
        self.orchestrator.close()
