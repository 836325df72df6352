"""What one ``conceptseg serve`` runs: the engines, profile, addresses and what goes into the
model repository. ``conceptseg serve``'s flags are generated from these fields
(``conceptseg.cli_args``); fields with ``cli=False`` are set by the program. Light: no Triton
client, so ``conceptseg --help`` stays fast.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from conceptseg.build import (
    CPU_ENGINE_RUNTIMES,
    MLLM_BACKENDS,
    MLLM_PRECISION_HELP,
    SERVE_CPU_SAM3_PRECISIONS,
)

LOCALHOST = "127.0.0.1"
INTERNAL = {"cli": False}


def _flag(default: Any, help_text: str, choices: Any = None) -> Any:
    return field(default=default, metadata={"help": help_text, "choices": choices})


@dataclass(kw_only=True)
class ServeConfig:
    """One server: engines, profile, addresses, and what goes into the repository."""

    engines: Path = field(metadata={"help": "conceptseg export output (manifest.json)"})
    profile: str = _flag(
        "cpu", "cpu (OpenVINO / ONNX Runtime engines) or gpu (TensorRT plans)", ("cpu", "gpu")
    )
    plans: Path | None = _flag(None, "gpu: TensorRT plans (default: the one ENGINES/trt-*)")
    host: str = _flag(LOCALHOST, "address to bind (default 127.0.0.1 only)")
    http_port: int = _flag(8000, "HTTP port")
    grpc_port: int = _flag(8001, "gRPC port")
    metrics_port: int = _flag(8002, "Prometheus metrics port")
    # "explicit": models can be unloaded/loaded (with the key); the supervisor reloads a model
    # whose stub died. "none": it stops the server instead (its own supervisor restarts it)
    model_control: str = _flag(
        "explicit",
        "explicit (default): a model whose stub died is reloaded; load/unload need the API key. "
        "none: a stub death stops serve",
        ("none", "explicit"),
    )
    # the restricted-API key (CONCEPTSEG_API_KEY; empty: generated per run, see Server.api_key)
    api_key: str = field(default="", metadata=INTERNAL)
    supervise: bool = field(default=True, metadata=INTERNAL)  # watch the stubs (supervisor)
    health_interval_s: float = field(default=0.5, metadata=INTERNAL)
    # Triton >= 2.59 (--http-max-input-size): refuse bigger HTTP inputs; 0: 4 + 1 images' limit
    max_input_bytes: int = field(default=0, metadata=INTERNAL)
    pipeline_config: dict[str, Any] = field(default_factory=dict, metadata=INTERNAL)
    orchestrator_instances: int = field(default=2, metadata=INTERNAL)
    engine_threads: int = field(default=0, metadata=INTERNAL)
    mllm_backend: str = _flag("", "default: hf on cpu, trtllm on gpu", ("", *MLLM_BACKENDS))
    mllm_precision: str = _flag("fp32", MLLM_PRECISION_HELP)
    engine_runtime: str = _flag(
        "openvino",
        "cpu: what runs the SAM 3 and CTM graphs (fp32; onnxruntime as before 3 December 2026)",
        CPU_ENGINE_RUNTIMES,
    )
    sam3_precision: str = _flag(
        "fp32",
        "cpu: bf16 serves the image encoder in bf16 under OpenVINO; int8 with int8 weights under "
        "ONNX Runtime (export --parts sam3_vision_int8); whatever --engine-runtime says",
        SERVE_CPU_SAM3_PRECISIONS,
    )
    mllm_path: Path | None = _flag(None, "MLLM directory (default: from ENGINES)")
    mllm_slots: int = _flag(
        0, "generations the MLLM runs at once (default: hf 1, ort-genai 4, trtllm 8)"
    )
    mllm_queue: int = _flag(8, "generations waiting behind them; past that: UNAVAILABLE")
    mllm_prefill_chunk: int = _flag(
        256, "ort-genai: prompt tokens per prefill unit (a newcomer holds running decodes that long)"
    )
    # another Triton build (gpu: with the tensorrt backend), used as it is: both or neither
    tritonserver: Path | None = _flag(
        None, "another Triton build's binary (gpu; with --backend-dir)"
    )
    backend_dir: Path | None = _flag(None, "its backends directory (gpu: tensorrt)")
    ready_timeout_s: float = field(default=300.0, metadata=INTERNAL)
    exit_timeout_s: int = field(default=30, metadata=INTERNAL)  # Triton's default
    log_verbose: int = field(default=0, metadata=INTERNAL)

    @property
    def urls(self) -> dict[str, str]:
        return {
            "http": f"{self.host}:{self.http_port}",
            "grpc": f"{self.host}:{self.grpc_port}",
            "metrics": f"http://{self.host}:{self.metrics_port}/metrics",
        }
