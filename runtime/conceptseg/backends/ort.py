"""ONNX Runtime graphs for the exported SAM 3 and CTM (``conceptseg export``).

Sessions are created once per process, configured for the machine (intra-op threads, full graph
optimisation, CPU memory arena, no spinning), and fed numpy. ONNX Runtime's intra-op threads
spin between parallel sections by default; in the server, where six processes share the cores,
that spinning took the CPU the other models needed (measured: tiny engines, 2 cores, reasoning
req/s at concurrency 4 went 4.33 -> 8.77 without it, benchmarks/README.md). The backends themselves (prompt layout, caches,
buckets) live in ``engines.py`` and are shared with TensorRT.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from conceptseg.models.engines import EngineCtm, EngineSam3, vision_graph
from conceptseg.types import RequestError


def session_options(threads: int | None = None) -> Any:
    import onnxruntime as ort  # heavy: onnxruntime, loaded with a session

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.enable_cpu_mem_arena = True
    opts.intra_op_num_threads = threads or os.cpu_count() or 1
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    no_spinning(opts)
    return opts


def no_spinning(opts: Any) -> None:
    """Intra-op threads sleep when idle instead of spinning (see the module docstring)."""
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")


class OrtGraph:
    """One exported graph: ``run(**feeds) -> dict of outputs`` (names from the ONNX file)."""

    def __init__(self, engines: Path, name: str, threads: int | None = None) -> None:
        import onnxruntime as ort  # heavy: onnxruntime, loaded with a session

        path = Path(engines) / f"{name}.onnx"
        if not path.exists():
            raise RequestError(
                "--engines", f"{path} is missing; export it with `conceptseg export --parts {name}`"
            )
        self.name = name
        self.session = ort.InferenceSession(
            str(path), session_options(threads), providers=["CPUExecutionProvider"]
        )
        self.outputs = [o.name for o in self.session.get_outputs()]

    def run(self, **feeds: np.ndarray) -> dict[str, np.ndarray]:
        return dict(zip(self.outputs, self.session.run(self.outputs, feeds), strict=True))


def ort_sam3(engines: Path, threads: int | None = None, precision: str = "fp32") -> EngineSam3:
    """SAM 3 on the ONNX graphs in ``engines``; ``precision`` int8 runs the image encoder with
    int8 weights (``conceptseg export --parts sam3_vision_int8``), text and heads stay fp32."""
    vision = vision_graph(precision)
    if not (Path(engines) / f"{vision}.onnx").exists() and precision == "int8":
        raise RequestError(
            "--sam3-precision",
            f"{engines}/{vision}.onnx is missing; make it with "
            f"`conceptseg export --weights DIR --out {engines} --parts sam3_vision_int8`",
        )
    graphs = {"sam3_vision": OrtGraph(engines, vision, threads)}
    graphs |= {n: OrtGraph(engines, n, threads) for n in ("sam3_text", "sam3_heads")}
    return EngineSam3(engines, graphs)


def ort_ctm(engines: Path, threads: int | None = None) -> EngineCtm:
    """The CTM on the ``ctm`` ONNX graph in ``engines``."""
    return EngineCtm(engines, OrtGraph(engines, "ctm", threads))
