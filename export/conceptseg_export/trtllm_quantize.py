"""``python -m conceptseg_export.trtllm_quantize``: the MLLM as a ModelOpt-quantized checkpoint that
TensorRT-LLM's LLM API (PyTorch backend) loads. GPU machines, TensorRT-LLM's environment.

- ``--qformat fp8`` (Ada/Hopper, SM >= 89), ``int4_awq`` (Ampere and later, SM >= 80) or
  ``w4a8_awq`` (int4 weights, fp8 activations: SM >= 89). The vision tower and ``lm_head`` stay
  bf16, and so does the KV cache (no KV quantizers: VLM answers are sensitive to it).
- Calibration runs on real ConceptSeg prompts, built by the runtime exactly as at inference
  (``mosaic.py`` + ``prompt.py`` + the checkpoint's processor): ``--calib requests.jsonl``, one
  request per line, ``{"image": PATH, "prompt": TEXT, "refs": ["IMG:x1,y1,x2,y2" | "IMG:MASK"]}``
  (paths relative to the file; the ``segment`` CLI's ``--ref`` syntax). Without it the bundled
  sample request is used, which is good for smoke tests only (and said so in the manifest).
- Output ``OUT/trtllm-<qformat>/``: ModelOpt's unified HF checkpoint (``hf_quant_config.json``)
  with the published architecture name (the TensorRT-LLM backend registers its model class
  under it), the processor files, and ``trtllm.json``: format, calibration, excluded modules,
  versions, and parity of the fake-quantized model against bf16 on the first calibration
  prompts (final-norm state error, last-position argmax agreement).
The CTM is not part of this checkpoint: the pipeline reads it from the original ``mllm/``.
"""

from __future__ import annotations

import argparse
import copy
import json
import shutil
import sys
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch

from conceptseg import cli_args, gpu_stack
from conceptseg.backends.trtllm_mllm import ARCHITECTURE, TRTLLM_PIN
from conceptseg.inputs import parse_ref, read_image
from conceptseg.models import qwen
from conceptseg.prompt import mllm_inputs
from conceptseg.samples import sample_request
from conceptseg.types import Request, UsageError
from conceptseg_export.mllm_export import PROCESSOR_FILES

MODELOPT_PIN = gpu_stack.load()["modelopt"]  # TensorRT-LLM's own requirement (gpu_stack.toml)
QFORMATS = {  # name -> (ModelOpt config, minimum SM)
    "fp8": ("FP8_DEFAULT_CFG", 89),
    "int4_awq": ("INT4_AWQ_CFG", 80),
    "w4a8_awq": ("W4A8_AWQ_BETA_CFG", 89),
}
KEEP_BF16 = ("*visual*", "*lm_head*")
PARITY_PROMPTS = 4


@dataclass
class QuantizeConfig:
    """Quantize ``weights/mllm`` for TensorRT-LLM."""

    weights: Path = field(metadata={"help": "directory with the mllm/ checkpoint"})
    out: Path = field(metadata={"help": "output directory (writes OUT/trtllm-<qformat>/)"})
    qformat: str = field(
        default="fp8", metadata={"help": "quantization format", "choices": sorted(QFORMATS)}
    )
    calib: Path | None = field(
        default=None, metadata={"help": "calibration requests, JSONL (default: bundled sample)"}
    )
    calib_size: int = field(default=64, metadata={"help": "calibration prompts (at most)"})


def add_cli_args(parser: argparse.ArgumentParser) -> None:
    cli_args.add_cli_args(parser, QuantizeConfig)


def from_cli_args(args: argparse.Namespace) -> QuantizeConfig:
    return cli_args.from_cli_args(args, QuantizeConfig)


def calibration_requests(path: Path | None, limit: int) -> list[Any]:
    """Requests from a JSONL file (see the module docstring), or the bundled sample."""

    if path is None:
        return [sample_request()]
    requests = []
    for number, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        item = json.loads(line)

        def local(p: str) -> str:
            return p if Path(p).is_absolute() else str(Path(path).parent / p)

        refs = []
        for i, spec in enumerate(item.get("refs", [])):
            image, sep, where = spec.rpartition(":")
            where = where if "," in where else local(where)  # a box, or a mask file
            refs.append(parse_ref(f"{local(image)}{sep}{where}", i))
        image = read_image(local(item["image"]), f"{path}:{number}")
        requests.append(Request(image=image, question=item["prompt"], references=tuple(refs)))
        if len(requests) == limit:
            break
    assert requests, f"{path} holds no requests"
    return requests


def calibration_inputs(requests: list[Any], processor: Any) -> list[dict[str, torch.Tensor]]:
    """The model inputs of each request, built as the pipeline builds them."""

    batches = []
    for request in requests:
        msgs, images, _ = mllm_inputs(request)
        batches.append(dict(qwen.chat_inputs(processor, msgs, images, tensors="pt")))
    return batches


def _disable(config: dict[str, Any], pattern: str) -> None:
    """Disable the quantizers matching ``pattern`` (dict- or list-style ``quant_cfg``)."""
    quant_cfg = config["quant_cfg"]
    if isinstance(quant_cfg, dict):
        quant_cfg[pattern] = {"enable": False}
    else:
        quant_cfg.append({"quantizer_name": pattern, "enable": False})


def quant_config(qformat: str) -> dict[str, Any]:
    import modelopt.torch.quantization as mtq  # optional: ModelOpt, GPU container only

    config = copy.deepcopy(getattr(mtq, QFORMATS[qformat][0]))
    for pattern in KEEP_BF16:
        _disable(config, pattern)
    return config  # no KV cache quantizer is added: the KV cache stays bf16


def _states(model: Any, batches: list[dict[str, torch.Tensor]]) -> list[torch.Tensor]:
    """Final-norm states of every prompt position (what the CTM reads, for the prompt)."""
    out = []
    with torch.inference_mode():
        for batch in batches:
            feeds = {k: v.to(model.device) for k, v in batch.items()}
            out.append(model.model(**feeds).last_hidden_state[0].float())
    return out


def _parity(model: Any, before: list[torch.Tensor], after: list[torch.Tensor]) -> dict[str, Any]:
    head = model.get_output_embeddings()
    rel, same = [], []
    for b, a in zip(before, after, strict=True):
        rel.append(float(((a - b).norm(dim=-1) / b.norm(dim=-1)).mean()))
        last = torch.stack([b[-1], a[-1]]).to(head.weight.dtype)
        choice = head(last).argmax(-1)
        same.append(bool(choice[0] == choice[1]))
    return {
        "prompts": len(before),
        "state_relative_error_mean": round(sum(rel) / len(rel), 5),
        "last_position_argmax_agreement": sum(same) / len(same),
    }


def _check_environment(qformat: str) -> None:
    import modelopt  # optional: ModelOpt, GPU container only

    if not torch.cuda.is_available():
        raise UsageError("--qformat", "ModelOpt calibration needs a CUDA GPU; run it in the image")
    major, minor = torch.cuda.get_device_capability()
    need = QFORMATS[qformat][1]
    if major * 10 + minor < need:
        raise UsageError(
            "--qformat",
            f"{qformat} needs SM >= {need}; this GPU is SM {major}{minor} (int4_awq runs on SM >= 80)",
        )
    if modelopt.__version__ != MODELOPT_PIN:
        raise UsageError(
            "nvidia-modelopt",
            f"{modelopt.__version__} installed; the stack's is {MODELOPT_PIN} (its quant_cfg "
            "format and export changed between releases): use docker/Dockerfile's image",
        )


def _write_checkpoint(model: Any, mllm_dir: Path, out: Path) -> None:
    from modelopt.torch.export import export_hf_checkpoint  # optional: ModelOpt, GPU container only


    export_hf_checkpoint(model, export_dir=str(out))
    config_path = out / "config.json"
    config = json.loads(config_path.read_text())
    config["architectures"] = [ARCHITECTURE]  # TrtllmMllm's registered class
    config_path.write_text(json.dumps(config, indent=2) + "\n")
    for name in PROCESSOR_FILES:
        if name != "config.json" and (mllm_dir / name).exists():
            shutil.copy2(mllm_dir / name, out / name)


def main(cfg: QuantizeConfig) -> Path:
    """Quantize, export and describe; returns the checkpoint directory."""
    import modelopt  # optional: ModelOpt, GPU container only
    import modelopt.torch.quantization as mtq  # optional: ModelOpt, GPU container only
    import transformers  # heavy: transformers, only on this path
    from transformers import (  # heavy: transformers, only on this path
        AutoProcessor,
        Qwen2_5_VLForConditionalGeneration,
    )


    _check_environment(cfg.qformat)
    mllm_dir = Path(cfg.weights) / "mllm"
    out = Path(cfg.out) / f"trtllm-{cfg.qformat}"
    out.mkdir(parents=True, exist_ok=True)
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(mllm_dir, dtype=torch.bfloat16)
    model = model.cuda().eval()  # type: ignore[call-arg]  # transformers wraps .cuda (stub quirk)
    processor = AutoProcessor.from_pretrained(mllm_dir)
    requests = calibration_requests(cfg.calib, cfg.calib_size)
    batches = calibration_inputs(requests, processor)
    before = _states(model, batches[:PARITY_PROMPTS])

    def forward_loop(m: Any) -> None:
        for batch in batches:  # language model activations on real prompts (images included)
            m.model(**{k: v.to(m.device) for k, v in batch.items()})

    print(f"calibrating {cfg.qformat} on {len(batches)} prompts ...", flush=True)
    model = mtq.quantize(model, quant_config(cfg.qformat), forward_loop)
    parity = _parity(model, before, _states(model, batches[:PARITY_PROMPTS]))
    _write_checkpoint(model, mllm_dir, out)
    record = {
        "qformat": cfg.qformat,
        "kv_cache": "bf16 (not quantized)",
        "kept_bf16": list(KEEP_BF16),
        "calibration": {
            "source": str(cfg.calib) if cfg.calib else "bundled sample request (smoke test only)",
            "prompts": len(batches),
        },
        "parity_fake_quant_vs_bf16": parity,
        "source": str(mllm_dir.resolve()),
        "gpu": torch.cuda.get_device_name(),
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "modelopt": modelopt.__version__, "tensorrt_llm_pin": TRTLLM_PIN},
    }  # fmt: skip
    (out / "trtllm.json").write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps(parity))
    return out


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_cli_args(parser)
    try:
        print(main(from_cli_args(parser.parse_args())))
    except AssertionError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
