"""The factory that wires backends behind the pipeline's Protocols (a composition layer).

``build_pipeline(weights, backend=...)`` is the one place that knows which implementation serves
which step; everything else sees ``SegBackend`` / ``MLLMBackend`` / ``CTMBackend``. Each backend
module is imported when chosen: each pulls its own heavy stack (torch, onnxruntime, TensorRT).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from conceptseg.config import PipelineConfig
from conceptseg.models.engines import SAM3_PRECISIONS, find_one
from conceptseg.pipeline import Pipeline
from conceptseg.types import RequestError
from conceptseg.versions import versions
from conceptseg.weights import check_weights

SEG_BACKENDS = ("torch", "onnxruntime", "openvino", "tensorrt")
GRAPH_BACKENDS = ("onnxruntime", "openvino", "tensorrt")  # those that run ENGINES' exported graphs
MLLM_BACKENDS = ("hf", "ort-genai", "trtllm")
# --mllm-precision per backend: hf loads the checkpoint in that dtype (int4 / int8: bf16 prefill,
# decode on weight-only int4 / int8 copies); ort-genai picks the exported ENGINES/mllm/<precision>;
# trtllm's precision is its quantized checkpoint's
MLLM_PRECISIONS = {"hf": ("fp32", "bf16", "int4", "int8"), "ort-genai": ("fp32", "int4"),
                   "trtllm": ("fp32",)}  # fmt: skip
MLLM_PRECISION_HELP = (
    "hf: fp32, bf16, int4 or int8 (bf16 prefill, weight-only decode); ort-genai: fp32 or int4"
)
# --sam3-precision per backend (the image encoder's): onnxruntime picks the int8 graph; torch runs
# bf16 autocast; openvino compiles the fp32 graph for bf16; TensorRT plans take theirs from
# `conceptseg build-engines`
SAM3_BACKEND_PRECISIONS = {"onnxruntime": SAM3_PRECISIONS, "torch": ("fp32", "bf16"),
                           "openvino": ("fp32", "bf16"), "tensorrt": ("fp32",)}  # fmt: skip
# --sam3-precision of `conceptseg serve --profile cpu` (the sam3_vision model; the other engine
# models run fp32 on --engine-runtime): fp32 on --engine-runtime, int8 on ONNX Runtime, bf16 on
# OpenVINO
SERVE_CPU_SAM3_PRECISIONS = (*SAM3_PRECISIONS, "bf16")
# what runs the engine models of the cpu profile (--engine-runtime): OpenVINO by default, as exact
# as ONNX Runtime in fp32 and faster on every SAM 3 graph (benchmarks/README.md, 3 December)
CPU_ENGINE_RUNTIMES = ("openvino", "onnxruntime")


def check_mllm_precision(kind: str, precision: str) -> None:
    allowed = MLLM_PRECISIONS.get(kind, ())
    if precision not in allowed:
        raise RequestError(
            "--mllm-precision", f"{precision!r} is not one of {allowed} for --mllm-backend {kind}"
        )


def build_mllm(
    kind: str,
    path: Path,
    config: PipelineConfig,
    *,
    threads: int | None = None,
    prefix_cache: int = 4,
    precision: str = "fp32",
    prefill_chunk: int = 256,
) -> Any:
    """The MLLM backend ``kind`` on the directory it loads (also used by the Triton ``mllm`` model).

    ``hf``: a ConceptSeg-R1 checkpoint, in fp32 (exact) or bf16 (``precision``); ``ort-genai``:
    an exported ``ENGINES/mllm/<precision>`` (``prefill_chunk``: prompt tokens per prefill unit
    when the scheduler interleaves prefills with decode steps); ``trtllm``: a checkpoint written by
    ``export/trtllm_quantize.py``.
    """
    limits = {"max_new_tokens": config.max_new_tokens, "max_length": config.max_length}
    if kind == "hf":
        from conceptseg.backends.hf_mllm import HfMllm  # lazy: torch + transformers

        check_mllm_precision(kind, precision)
        return HfMllm(path, prefix_cache=prefix_cache, precision=precision, **limits)
    if kind == "ort-genai":
        from conceptseg.backends.ortgenai_mllm import OrtGenaiMllm  # lazy: onnxruntime-genai

        return OrtGenaiMllm(path, threads=threads, prefill_chunk=prefill_chunk, **limits)
    if kind == "trtllm":
        from conceptseg.backends.trtllm_mllm import trtllm_mllm  # lazy: TensorRT-LLM (GPU)

        return trtllm_mllm(path, **limits)
    raise RequestError("--mllm-backend", f"{kind!r} is not one of {MLLM_BACKENDS}")


def build_pipeline(
    weights: Path,
    *,
    backend: str = "torch",
    mllm_backend: str = "hf",
    engines: Path | None = None,
    config: PipelineConfig | None = None,
    threads: int | None = None,
    plans: Path | None = None,
    mllm_precision: str = "fp32",
    prefix_cache: int = 4,
    sam3_precision: str = "fp32",
) -> Any:
    """A :class:`~conceptseg.pipeline.Pipeline` over the checkpoints in ``weights/{mllm,sam3}``.

    ``backend`` serves SAM 3 and the CTM: ``torch`` (the reference modules), ``onnxruntime`` or
    ``openvino`` (the graphs exported into ``engines``) or ``tensorrt`` (plans built from them, in
    ``plans`` or the one ``engines/trt-*`` directory). ``mllm_backend``: ``hf`` (transformers; reuses the
    prefill of the last ``prefix_cache`` reference mosaics), ``ort-genai`` (the decoder exported
    into ``engines/mllm/<mllm_precision>``, fp32 or int4) or ``trtllm`` (GPU machines; a
    checkpoint written by ``export/trtllm_quantize.py``: ``plans`` or ``engines/trtllm-*``).
    ``sam3_precision``: the image encoder's, int8 weights (onnxruntime), bf16 autocast (torch) or
    bf16 kernels (openvino).
    """
    if backend not in SEG_BACKENDS:
        raise RequestError("--backend", f"{backend!r} is not one of {SEG_BACKENDS}")
    if mllm_backend not in MLLM_BACKENDS:
        raise RequestError("--mllm-backend", f"{mllm_backend!r} is not one of {MLLM_BACKENDS}")
    check_mllm_precision(mllm_backend, mllm_precision)
    if sam3_precision not in SAM3_BACKEND_PRECISIONS[backend]:
        raise RequestError(
            "--sam3-precision",
            f"{sam3_precision!r} is not one of {SAM3_BACKEND_PRECISIONS[backend]} for --backend "
            f"{backend} (int8: onnxruntime; bf16: torch, openvino; TensorRT plans take their precision "
            "from `conceptseg build-engines`)",
        )
    config = config or PipelineConfig()
    mllm_dir, sam3_dir = check_weights(weights)
    if (backend in GRAPH_BACKENDS or mllm_backend != "hf") and engines is None:
        raise RequestError(
            "--engines",
            f"--backend {backend} / --mllm-backend {mllm_backend} needs the exported graphs: "
            "run `conceptseg export --weights DIR --out ENGINES` first",
        )
    if backend == "onnxruntime":
        from conceptseg.backends.ort import ort_ctm, ort_sam3  # lazy: onnxruntime

        seg: Any = ort_sam3(engines, threads, sam3_precision)
        ctm: Any = ort_ctm(engines, threads)
    elif backend == "openvino":
        from conceptseg.backends.openvino import ov_ctm, ov_sam3  # lazy: OpenVINO

        seg, ctm = ov_sam3(engines, threads, sam3_precision), ov_ctm(engines, threads)
    elif backend == "tensorrt":
        from conceptseg.backends.trt import trt_ctm, trt_sam3  # lazy: TensorRT (GPU)

        seg, ctm = trt_sam3(engines, plans), trt_ctm(engines, plans)
    else:
        from conceptseg.backends.torch_ref import torch_ctm, torch_sam3  # lazy: torch

        seg, ctm = torch_sam3(sam3_dir, sam3_precision), torch_ctm(mllm_dir)
    if mllm_backend == "ort-genai":
        mllm_path = Path(engines) / "mllm" / mllm_precision
    elif mllm_backend == "trtllm":
        hint = "quantize with `python -m conceptseg_export.trtllm_quantize --out ENGINES`"
        mllm_path = plans or find_one(engines, "trtllm-*", "--plans", hint)
    else:
        mllm_path = mllm_dir
    mllm = build_mllm(mllm_backend, mllm_path, config, threads=threads, prefix_cache=prefix_cache,
                      precision=mllm_precision)  # fmt: skip
    info = versions(weights, backend=backend, mllm_backend=mllm_backend, engines=str(engines or ""),
                    mllm_precision=mllm_precision,
                    sam3_precision=sam3_precision)  # fmt: skip
    return Pipeline(seg, mllm, ctm, config, info)
