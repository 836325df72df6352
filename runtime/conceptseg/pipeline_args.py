"""The flags that choose backends and pipeline switches (``segment``, ``demo``, ``eval``,
``serve``), and the pipeline they build: one definition for every command that takes them."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from conceptseg import config as cfg
from conceptseg.build import MLLM_BACKENDS, MLLM_PRECISION_HELP, SEG_BACKENDS, build_pipeline
from conceptseg.models.engines import SAM3_PRECISIONS
from conceptseg.pipeline import check_request
from conceptseg.types import Request, UsageError


def config_from_args(args: argparse.Namespace) -> Any:
    overrides: dict[str, Any] = {"router": not args.no_router}
    if args.max_new_tokens:
        overrides["max_new_tokens"] = args.max_new_tokens
    try:
        return cfg.from_env(cfg.from_name(args.preset, **overrides))
    except (ValueError, AssertionError) as exc:
        raise UsageError("--preset/--max-new-tokens/CONCEPTSEG_*", str(exc)) from None


def pipeline_from_args(args: argparse.Namespace, request: Request | None = None) -> Any:
    """Check the request first (cheap), then load the models."""
    config = config_from_args(args)
    if request is not None:
        check_request(request, config)
    engines = Path(args.engines) if args.engines else None
    return build_pipeline(
        Path(args.weights),
        backend=args.backend,
        mllm_backend=args.mllm_backend,
        engines=engines,
        config=config,
        plans=Path(args.plans) if args.plans else None,
        mllm_precision=args.mllm_precision,
        sam3_precision=args.sam3_precision,
    )


def add_pipeline_args(p: argparse.ArgumentParser, weights_default: str | None = None) -> None:
    p.add_argument(
        "--weights",
        required=weights_default is None,
        default=weights_default,
        help="directory with mllm/ and sam3/ checkpoints",
    )
    p.add_argument("--backend", default="torch", choices=SEG_BACKENDS,
                   help="SAM 3 and CTM backend")  # fmt: skip
    p.add_argument(
        "--engines", default=None, help="exported graphs (conceptseg export) for onnxruntime, openvino"
    )
    p.add_argument("--plans", default=None, help="TensorRT plans (default: the one ENGINES/trt-*)")
    p.add_argument("--mllm-backend", default="hf", choices=MLLM_BACKENDS, help="MLLM backend")
    p.add_argument(
        "--mllm-precision",
        default="fp32",
        help=MLLM_PRECISION_HELP,
    )
    p.add_argument("--sam3-precision", default="fp32", choices=(*SAM3_PRECISIONS, "bf16"),
                   help="the image encoder: int8 weights (onnxruntime), bf16 autocast (torch) "
                        "or bf16 kernels (openvino)")  # fmt: skip
    add_config_args(p)


def add_config_args(p: argparse.ArgumentParser) -> None:
    """The pipeline switches (``PipelineConfig``) that ``segment``, ``demo`` and ``serve`` take."""
    p.add_argument("--preset", default="reference", choices=sorted(cfg.PRESETS),
                   help="pipeline preset")  # fmt: skip
    p.add_argument(
        "--no-router", action="store_true", help="always run the MLLM (skip the SAM 3 probe)"
    )
    default = cfg.PipelineConfig().max_new_tokens
    p.add_argument("--max-new-tokens", type=int, default=0,
                   help=f"cap on generated tokens (default {default})")  # fmt: skip
