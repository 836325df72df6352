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

import numpy as np
import onnx_ir as ir
import pytest
import torch
from onnxruntime.quantization.matmul_nbits_quantizer import (
    DefaultWeightOnlyQuantConfig,
    DefaultWeightOnlyQuantizer,
)

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


def _anon_mb():
    return genai_builder._status_kb("RssAnon") / 1024


def test_the_pass_holds_no_float_weight():
    """What stays behind after the pass is the int4 weights, not the fp32 ones: 8 lazy fp32
    weights of 32 MB each leave about 5 MB each (int4 blocks and scales). Holding the
    quantizer's TensorProtos kept each fp32 weight alive with them (~300 MB here)."""
    rows, cols, count = 2048, 4096, 8
    x = ir.Value(name="x", shape=ir.Shape(["n", rows]), type=ir.TensorType(ir.DataType.FLOAT))
    graph = ir.Graph([x], [], nodes=[], name="g", opset_imports={"": 21})
    for i in range(count):  # x @ w_i for each i, side by side

        def make(i=i):
            return ir.Tensor(np.random.default_rng(i).standard_normal((rows, cols), np.float32))

        lazy = ir.LazyTensor(make, dtype=ir.DataType.FLOAT, shape=ir.Shape([rows, cols]), name=f"w{i}")
        weight = ir.Value(name=f"w{i}", shape=lazy.shape, type=ir.TensorType(lazy.dtype), const_value=lazy)
        graph.register_initializer(weight)
        node = ir.Node("", "MatMul", [x, weight], name=f"m{i}", num_outputs=1)
        node.outputs[0].name = f"y{i}"
        graph.append(node)
        graph.outputs.append(node.outputs[0])

    class Builder:
        ep, matmul_attrs = "cpu", {}
        model = ir.Model(graph, ir_version=10)
        quant_attrs = {"use_qdq": False, "op_types_to_quantize": ("MatMul",), "matmul_block_size": 32,
                       "is_symmetric": True, "accuracy_level": 4, "bits": 4, "nodes_to_exclude": []}  # fmt: skip

    before = _anon_mb()
    model = genai_builder.streaming_to_nbits(Builder(), lambda b: pytest.fail("took the stock pass"))
    grown = _anon_mb() - before
    ops = [n.op_type for n in model.graph]
    assert ops.count("MatMulNBits") == count and "MatMul" not in ops
    assert [v.name for v in model.graph.outputs] == [f"y{i}" for i in range(count)]
    assert sorted(model.graph.initializers) == sorted(
        f"w{i}_{suffix}" for i in range(count) for suffix in ("Q4", "scales")
    ), sorted(model.graph.initializers)
    assert grown < 120, f"the pass left {grown:.0f} MB behind (int4 of 8 x 32 MB is ~40 MB)"


def test_a_weight_past_the_proto_limit_goes_in_column_slices(monkeypatch):
    """A weight over PROTO_BYTES (the 7B LM head's fp32 copy is 2.2 GB; protobuf stops at 2 GB)
    is quantized in slices of columns: the same node and tensors as the whole weight at once."""
    rows, cols = 96, 1000  # K not a multiple of the block, columns not a multiple of the slice
    array = np.random.default_rng(0).standard_normal((rows, cols), np.float32)
    x = ir.Value(name="x", shape=ir.Shape(["n", rows]), type=ir.TensorType(ir.DataType.FLOAT))
    weight = ir.Value(name="w", const_value=ir.Tensor(array, name="w"))
    node = ir.Node("", "MatMul", [x, weight], name="m", num_outputs=1)
    node.outputs[0].name = "y"
    for symmetric in (True, False):
        quantizer = DefaultWeightOnlyQuantizer(DefaultWeightOnlyQuantConfig(
            block_size=32, is_symmetric=symmetric, accuracy_level=4, bits=4))  # fmt: skip
        whole_node, whole = genai_builder._quantize_one(quantizer, node)
        monkeypatch.setattr(genai_builder, "PROTO_BYTES", rows * 4 * 300)  # slices of 300 columns
        split_node, split = genai_builder._quantize_one(quantizer, node)
        monkeypatch.undo()
        assert split_node == whole_node
        assert [t.name for t in split] == [t.name for t in whole] and len(whole) == 2 + (not symmetric)
        for a, b in zip(split, whole, strict=True):
            assert a.shape == b.shape and a.numpy().tobytes() == b.numpy().tobytes(), a.name
