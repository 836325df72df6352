"""The orchestrator: ``conceptseg.pipeline`` over the engine models, through BLS.

Serves two models from one file: ``conceptseg`` (one response per request) and, when its config
is decoupled, ``conceptseg_stream`` (interim ``text`` responses with the reasoning text as it is
generated, then the final response). Each request of a batch runs in a worker thread of the
orchestrator's pool (the pipeline is synchronous); its BLS calls are ``async_exec`` on this
model's event loop. Bad requests come back as INVALID_ARG naming the field, anything else as
INTERNAL for that request only.
"""

import asyncio
import json
from pathlib import Path

import triton_python_backend_utils as pb_utils

from conceptseg import contract
from conceptseg.serving import glue
from conceptseg.serving.bls import Bls
from conceptseg.serving.orchestrator import Orchestrator, serving_versions


class TritonPythonModel:
    def initialize(self, args):
        params = glue.model_params(args, ("engines", "profile", "pipeline_config"))
        engines = Path(params["engines"])
        config = json.loads(args["model_config"])
        self.decoupled = pb_utils.using_decoupled_model_transaction_policy(config)
        self.bls = Bls(pb_utils, loop=None)  # bound to the running loop in execute
        self.orchestrator = Orchestrator(
            engines,
            self.bls,
            glue.pipeline_config(params),
            serving_versions(engines, params),
            workers=max(1, config["max_batch_size"]),
        )

    async def execute(self, requests):
        self.bls.loop = asyncio.get_running_loop()
        if self.decoupled:
            await asyncio.gather(*(self._stream(request) for request in requests))
            return None
        responses = await asyncio.gather(*(self._respond(request) for request in requests))
        assert len(responses) == len(requests)
        return list(responses)

    async def _respond(self, request):
        try:
            arrays = glue.read_inputs(pb_utils, request, list(contract.INPUTS))
            out = await self.orchestrator.submit(arrays)
            return glue.to_response(pb_utils, out)
        except Exception as exc:  # noqa: BLE001 - one request fails, the batch goes on
            return glue.error_response(pb_utils, exc, pb_utils.Logger)

    async def _stream(self, request):
        sender = request.get_response_sender()
        final = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL

        def send_text(delta):
            sender.send(glue.to_response(pb_utils, contract.text_delta_arrays(delta)))

        try:
            arrays = glue.read_inputs(pb_utils, request, list(contract.INPUTS))
            out = await self.orchestrator.submit(arrays, send_text)
            sender.send(glue.to_response(pb_utils, out), flags=final)
        except Exception as exc:  # noqa: BLE001 - one request fails, the batch goes on
            glue.send_final_error(pb_utils, sender, exc)

    def finalize(self):
        self.orchestrator.pool.shutdown(wait=False, cancel_futures=True)
