"""Engine model, cpu profile: one exported graph (parameter ``graph``) in an ONNX Runtime session
or, with ``runtime`` openvino, compiled by OpenVINO in ``precision`` (fp32 or bf16).

A dynamic batch is run as one call per group of equal input shapes; a failing group fails only
its own requests. Engine models are reachable by clients too, so each request is re-checked
first (dynamic dims bounded, floats finite, masks 0/1): a bad one gets INVALID_ARG by name.
"""

from pathlib import Path

import triton_python_backend_utils as pb_utils

from conceptseg.backends.ort import OrtGraph
from conceptseg.serving import glue
from conceptseg.types import RequestError


class TritonPythonModel:
    def initialize(self, args):
        params = glue.model_params(args, ("engines", "graph", "threads", "runtime", "precision"))
        engines, graph = Path(params["engines"]), params["graph"]
        threads = int(params["threads"]) or None
        if params["runtime"] == "openvino":
            from conceptseg.backends.openvino import OvGraph  # heavy: OpenVINO, where chosen

            self.graph = OvGraph(engines, graph, threads, params["precision"])
        else:
            self.graph = OrtGraph(engines, graph, threads)
        self.shapes = glue.graph_inputs(engines, graph)
        self.bounds = glue.engine_bounds(engines)

    def execute(self, requests):
        feeds = [glue.read_inputs(pb_utils, request, list(self.shapes)) for request in requests]
        outputs: list = [None] * len(feeds)
        for i, feed in enumerate(feeds):
            try:
                glue.check_engine_feed(feed, self.shapes, self.bounds)
            except RequestError as exc:
                outputs[i] = exc
        good = [i for i, out in enumerate(outputs) if out is None]
        for i, out in zip(
            good, glue.run_batched(self.graph, [feeds[i] for i in good]), strict=True
        ):
            outputs[i] = out
        responses = [
            glue.error_response(pb_utils, out, pb_utils.Logger)
            if isinstance(out, Exception)
            else glue.to_response(pb_utils, out)
            for out in outputs
        ]
        assert len(responses) == len(requests)
        return responses
