"""Engine model, cpu profile: one exported graph (parameter ``graph``) in an ONNX Runtime session.

A dynamic batch is run as one call per group of equal input shapes; a failing group fails only
its own requests.
"""

from pathlib import Path

import triton_python_backend_utils as pb_utils

from conceptseg.backends.ort import OrtGraph
from conceptseg.serving import glue


class TritonPythonModel:
    def initialize(self, args):
        params = glue.model_params(args, ("engines", "graph", "threads"))
        threads = int(params["threads"]) or None
        self.graph = OrtGraph(Path(params["engines"]), params["graph"], threads)
        self.inputs = [i.name for i in self.graph.session.get_inputs()]

    def execute(self, requests):
        feeds = [glue.read_inputs(pb_utils, request, self.inputs) for request in requests]
        responses = [
            glue.error_response(pb_utils, out, pb_utils.Logger)
            if isinstance(out, Exception)
            else glue.to_response(pb_utils, out)
            for out in glue.run_batched(self.graph, feeds)
        ]
        assert len(responses) == len(requests)
        return responses
