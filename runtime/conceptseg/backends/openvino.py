"""OpenVINO runs the exported SAM 3 and CTM graphs on the CPU (``--backend openvino``, and the
cpu serving profile's engine models by default).

OpenVINO reads our ONNX files as they are: no conversion step, nothing else to export. Measured
at real size on 2 cores with AMX (benchmarks/README.md, "CPU peers"): in fp32 it is as exact as
ONNX Runtime and faster on every SAM 3 graph (image encoder 19.1 vs 22.1 s); in bf16 the image
encoder takes 6.4 s (torch bf16 autocast: 7.0 s) but its features are 1.5 % from fp32, so bf16
is opt-in. The precision is per graph: ``bf16`` (``INFERENCE_PRECISION_HINT``; on a CPU without
bf16 units OpenVINO runs fp32) or ``fp32``, set explicitly because OpenVINO picks bf16 by itself
on such CPUs. ``--sam3-precision`` chooses the image encoder's; text, heads and CTM run fp32.

Like ONNX Runtime in ``ort.py``, threads are not pinned to cores: in the server several
processes share them. The SAM 3 and CTM backends (prompt layout, caches, buckets) are
``models/engines.py``'s, shared with ONNX Runtime and TensorRT; only the graph runner differs.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

import numpy as np

from conceptseg.models.engines import EngineCtm, EngineSam3
from conceptseg.types import RequestError

OV_PRECISIONS = {"fp32": "f32", "bf16": "bf16"}  # ours -> INFERENCE_PRECISION_HINT


def compile_config(threads: int | None, precision: str) -> dict[str, str]:
    """The CPU plugin's properties for one graph: latency (one stream), ``threads`` threads, not
    pinned, ``precision`` (``fp32`` | ``bf16``)."""
    if precision not in OV_PRECISIONS:
        raise RequestError(
            "--sam3-precision", f"{precision!r} is not one of {tuple(OV_PRECISIONS)} for OpenVINO"
        )
    return {
        "PERFORMANCE_HINT": "LATENCY",
        "NUM_STREAMS": "1",
        "INFERENCE_NUM_THREADS": str(threads or os.cpu_count() or 1),
        "ENABLE_CPU_PINNING": "NO",
        "INFERENCE_PRECISION_HINT": OV_PRECISIONS[precision],
    }


class OvGraph:
    """One exported graph compiled for OpenVINO's CPU plugin: ``run(**feeds) -> dict``.

    One infer request serves every call, one call at a time; outputs are copied out, so a
    result stays valid after the next call. A feed of another dtype than the graph's input is
    refused, as ONNX Runtime refuses it (OpenVINO itself would convert it).
    """

    def __init__(
        self, engines: Path, name: str, threads: int | None = None, precision: str = "fp32"
    ) -> None:
        import openvino as ov  # heavy: OpenVINO's runtime, loaded with a graph

        path = Path(engines) / f"{name}.onnx"
        if not path.exists():
            raise RequestError(
                "--engines", f"{path} is missing; export it with `conceptseg export --parts {name}`"
            )
        self.name = name
        core = ov.Core()
        model = core.read_model(str(path))
        compiled = core.compile_model(model, "CPU", compile_config(threads, precision))
        # the ONNX names, from the model as read (a compiled output may carry more names)
        self.outputs = [p.get_any_name() for p in model.outputs]
        self.dtypes = {p.get_any_name(): p.get_element_type().to_dtype() for p in model.inputs}
        self._request = compiled.create_infer_request()
        self._lock = threading.Lock()

    def run(self, **feeds: np.ndarray) -> dict[str, np.ndarray]:
        for name, array in feeds.items():  # OpenVINO would convert silently; ONNX Runtime refuses
            if name in self.dtypes and array.dtype != self.dtypes[name]:
                raise TypeError(f"{self.name}.{name}: {array.dtype}, the graph takes {self.dtypes[name]}")
        with self._lock:
            result = self._request.infer(feeds, share_inputs=False, share_outputs=False)
            return {name: result[i] for i, name in enumerate(self.outputs)}  # copies (not shared)


def ov_sam3(engines: Path, threads: int | None = None, precision: str = "fp32") -> EngineSam3:
    """SAM 3 on the ONNX graphs in ``engines`` under OpenVINO: the image encoder in ``precision``
    (bf16 or fp32), text and heads in fp32."""
    graphs = {"sam3_vision": OvGraph(engines, "sam3_vision", threads, precision)}
    graphs |= {n: OvGraph(engines, n, threads, "fp32") for n in ("sam3_text", "sam3_heads")}
    return EngineSam3(engines, graphs)


def ov_ctm(engines: Path, threads: int | None = None) -> EngineCtm:
    """The CTM on the ``ctm`` ONNX graph in ``engines``, fp32 under OpenVINO."""
    return EngineCtm(engines, OvGraph(engines, "ctm", threads, "fp32"))
