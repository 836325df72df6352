"""What ``conceptseg export`` exports and where: its config and CLI flags (light: no torch, so
``conceptseg --help`` does not load the exporters)."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from pathlib import Path

from conceptseg import cli_args
from conceptseg.build import MLLM_PRECISIONS as MLLM_PRECISIONS_BY_BACKEND
from conceptseg.types import UsageError

# graph -> (input names, output names): the ONNX contract the runtime reads
GRAPHS = {
    "sam3_vision": (("image",), ("fpn0", "fpn1", "fpn2")),
    "sam3_text": (("input_ids", "attention_mask"), ("text_features",)),
    "sam3_heads": (
        ("fpn0", "fpn1", "fpn2", "prompt", "prompt_mask", "boxes", "box_labels"),
        (
            "presence_logits",
            "semantic_logits",
            "instance_scores",
            "instance_boxes",
            "instance_masks",
        ),
    ),
    "ctm": (("hidden", "key_mask"), ("concept",)),
}
MLLM_PRECISIONS = MLLM_PRECISIONS_BY_BACKEND["ort-genai"]  # ort-genai decoder builds

DEFAULT_PARTS = (*GRAPHS, "mllm")  # mllm: Qwen2.5-VL vision + embedding graphs, ort-genai decoder
# opt-in: sam3_vision with dynamic int8 MatMul weights, for ONNX Runtime on CPUs (2.15x torch
# at 1008 px on 2 cores, benchmarks/README.md); TensorRT quantizes on its own (--fp8)
INT8_VISION = "sam3_vision_int8"
PARTS = (*DEFAULT_PARTS, INT8_VISION)
EXTERNAL_DATA_BYTES = 1 << 30  # graphs with more weights than this keep them in <graph>.onnx.data


@dataclass
class ExportConfig:
    """What to export and where."""

    weights: Path = field(metadata={"help": "directory with mllm/ and sam3/ checkpoints"})
    out: Path = field(metadata={"help": "output directory, e.g. engines/tiny"})
    parts: str = field(
        default="all",
        metadata={
            "help": "comma list of sam3_vision,sam3_text,sam3_heads,ctm,mllm (= all) and the "
            "opt-in sam3_vision_int8 (ONNX Runtime CPU)"
        },
    )
    mllm_precisions: str = field(
        default="fp32,int4",
        metadata={"help": "comma list of ort-genai decoder precisions: fp32,int4"},
    )
    mllm_verify_tokens: int = field(
        default=24,
        metadata={"help": "greedy tokens compared with transformers after the mllm export"},
    )
    top_k: int = field(default=16, metadata={"help": "instances returned by the heads graph"})
    q_max: int = field(
        default=0, metadata={"help": "concept slots in the heads prompt (0: the CTM's Q)"}
    )
    opset: int = field(default=18, metadata={"help": "ONNX opset"})

    def part_list(self) -> list[str]:
        parts = [p.strip() for p in self.parts.split(",") if p.strip()]
        if "all" in parts:
            parts = list(DEFAULT_PARTS) + [p for p in parts if p not in (*DEFAULT_PARTS, "all")]
        unknown = sorted(set(parts) - set(PARTS))
        if unknown:
            raise UsageError("--parts", f"unknown {unknown}; choose from {list(PARTS)} or 'all'")
        return parts

    def mllm_precision_list(self) -> tuple[str, ...]:
        chosen = tuple(p.strip() for p in self.mllm_precisions.split(",") if p.strip())
        unknown = sorted(set(chosen) - set(MLLM_PRECISIONS))
        if unknown or not chosen:
            raise UsageError(
                "--mllm-precisions", f"got {self.mllm_precisions!r}; choose from {list(MLLM_PRECISIONS)}"
            )
        return chosen


def add_cli_args(parser: argparse.ArgumentParser) -> None:
    cli_args.add_cli_args(parser, ExportConfig)


def from_cli_args(args: argparse.Namespace) -> ExportConfig:
    return cli_args.from_cli_args(args, ExportConfig)
