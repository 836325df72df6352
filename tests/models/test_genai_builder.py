"""The decoder from our one-weight-at-a-time int4 pass against ort-genai's builder run as it ships.

The tiny checkpoint saved in bf16 (as real checkpoints are: the builder's weights are then lazy
bf16 -> fp32 casts). Both builds must give the same files, byte for byte: the same graph, the
same int4 blocks and scales.
Run: .venv/bin/pytest tests/models/test_genai_builder.py -q
"""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from conceptseg_export import genai_builder
from conceptseg_export.mllm_export import _stage_checkpoint

OPTIONS = ["exclude_embeds=true", "include_hidden_states=true", "prune_lm_head=true",
           "block_size=32", "is_symmetric=true"]  # fmt: skip


@pytest.fixture(scope="module")
def bf16_stage(tiny_weights, tmp_path_factory):
    from safetensors.torch import load_file, save_file

    mllm = tmp_path_factory.mktemp("bf16") / "mllm"
    shutil.copytree(tiny_weights / "mllm", mllm)
    tensors = load_file(mllm / "model.safetensors")
    save_file({k: v.to(torch.bfloat16) for k, v in tensors.items()}, mllm / "model.safetensors",
              metadata={"format": "pt"})  # fmt: skip
    config = json.loads((mllm / "config.json").read_text())
    config["torch_dtype"] = config["dtype"] = "bfloat16"
    (mllm / "config.json").write_text(json.dumps(config))
    stage = mllm.parent / "stage"
    _stage_checkpoint(mllm, stage)
    return stage


def _build(module, stage, out, extra):
    command = [sys.executable, "-m", module, "-i", str(stage), "-o", str(out), "-p", "int4",
               "-e", "cpu", "-c", str(out.parent / f"{out.name}-cache"), "--extra_options",
               *OPTIONS, *extra]  # fmt: skip
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    done = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    return out


@pytest.mark.parametrize("accuracy_level", [4])
def test_streaming_int4_is_the_builders_own(bf16_stage, tmp_path, accuracy_level):
    extra = [f"accuracy_level={accuracy_level}"]
    stock = _build("onnxruntime_genai.models.builder", bf16_stage, tmp_path / "stock", extra)
    ours = _build("conceptseg_export.genai_builder", bf16_stage, tmp_path / "ours", extra)
    for name in ("model.onnx", "model.onnx.data", "genai_config.json"):
        assert (ours / name).read_bytes() == (stock / name).read_bytes(), name
    import onnx

    nodes = [n.op_type for n in onnx.load(ours / "model.onnx", load_external_data=False).graph.node]
    assert "MatMulNBits" in nodes and "MatMul" not in nodes  # every weight went through the pass
    memory = json.loads((ours / genai_builder.MEMORY_FILE).read_text())
    assert 0 < memory["peak_anon_gb"] <= memory["peak_rss_gb"] and memory["seconds"] > 0


def test_other_configurations_take_the_builders_pass():
    """A QDQ build (not what build_decoder asks for) goes to the builder's own pass."""
    calls = []

    class Builder:
        quant_attrs = {"use_qdq": True, "op_types_to_quantize": ("MatMul",)}

    assert (
        genai_builder.streaming_to_nbits(Builder(), lambda b: calls.append(b) or "theirs")
        == "theirs"
    )
    assert len(calls) == 1
