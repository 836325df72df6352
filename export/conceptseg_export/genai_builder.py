"""ort-genai's model builder, with its int4 pass one weight at a time (``python -m
conceptseg_export.genai_builder`` takes the builder's own arguments).

onnxruntime-genai 0.18's builder emits the decoder with float ``MatMul`` nodes whose weights are
lazy casts of the checkpoint's, then quantizes the whole graph at once: ``Model.to_nbits`` hands
``ir.to_proto(model)``, every weight materialized in fp32, to ORT's ``MatMulNBitsQuantizer``
(~12 GB at 3B, ~28 GB at 7B). Here ``to_nbits`` gives one ``MatMul`` at a time to the same
per-node quantizer (ORT's ``DefaultWeightOnlyQuantizer``, which ``MatMulNBitsQuantizer`` calls
for each node) and drops the float weight before the next. The output is the builder's own,
byte for byte (``tests/models/test_genai_builder.py``); configurations other than plain RTN in
the QOperator format (what ``build_decoder`` asks for) take the builder's own pass. Two things
kept the first 7B builds from fitting in 24 GiB: the quantizer's output tensors, held as
protobuf messages, kept each fp32 weight alive (:func:`_quantize_columns`), and the 7B LM
head's fp32 copy is past protobuf's 2 GB limit (:func:`_quantize_one` slices it by columns).

The process's peak memory goes to ``OUT/builder_memory.json``: ``VmHWM`` (peak resident set,
which counts the mapped checkpoint pages the builder read: page cache the kernel can drop) and
the peak of ``RssAnon`` sampled every 50 ms (the memory the builder itself holds).
"""

from __future__ import annotations

import importlib
import json
import re
import runpy
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir
from onnxruntime.quantization.matmul_nbits_quantizer import (
    DefaultWeightOnlyQuantConfig,
    DefaultWeightOnlyQuantizer,
)

MEMORY_FILE = "builder_memory.json"
PROTO_BYTES = 2**30  # a weight above this goes to the quantizer in slices (protobuf stops at 2 GB)
_SAMPLE_S = 0.05


def _status_kb(field: str) -> int:
    found = re.search(rf"^{field}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.M)
    return int(found.group(1)) if found else 0


class MemoryWatch:
    """Samples this process's anonymous resident memory until :meth:`stop`."""

    def __init__(self) -> None:
        self.peak_anon_kb = _status_kb("RssAnon")
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._done.wait(_SAMPLE_S):
            self.peak_anon_kb = max(self.peak_anon_kb, _status_kb("RssAnon"))

    def stop(self) -> dict[str, float]:
        self._done.set()
        self._thread.join()
        self.peak_anon_kb = max(self.peak_anon_kb, _status_kb("RssAnon"))
        return {"peak_rss_gb": round(_status_kb("VmHWM") / 2**20, 2),
                "peak_anon_gb": round(self.peak_anon_kb / 2**20, 2)}  # fmt: skip


def _plain_rtn(builder: Any) -> bool:
    """Whether ``builder``'s int4 pass is the one :func:`streaming_to_nbits` reproduces."""
    attrs = builder.quant_attrs
    return (
        not attrs["use_qdq"]
        and getattr(builder, "quantization_algo", "default") == "default"
        and not getattr(builder, "int4_customized_weight_config", None)
        and not getattr(builder, "exact_quant_overrides", None)
        and not getattr(builder, "exact_quant_override_names", None)
        and not (builder.ep == "cuda" and builder.matmul_attrs.get("weights_prepacked", 0) > 0)
        and tuple(attrs["op_types_to_quantize"]) == ("MatMul",)
    )


def _quantize_columns(quantizer: Any, node: ir.Node, array: np.ndarray
                      ) -> tuple[onnx.NodeProto, list[ir.Tensor]]:  # fmt: skip
    """ORT's quantizer on a graph of ``node`` and ``array`` (its weight, or some of its columns)
    alone: the new node and tensors.

    The tensors come back as numpy copies, not as the quantizer's ``TensorProto``: with the upb
    protobuf runtime a message keeps its whole arena alive, so holding one of the graph's
    initializers would hold the fp32 weight too (every weight of the model, by the end: what
    killed the first 7B builds for memory)."""
    weight, activation = node.inputs[1], node.inputs[0]
    assert weight is not None and weight.name and activation is not None and activation.name
    assert node.outputs[0].name
    tensor = onnx.numpy_helper.from_array(array, weight.name)
    proto = onnx.helper.make_node(
        "MatMul", [activation.name, weight.name], [node.outputs[0].name], name=node.name
    )
    graph = onnx.helper.make_graph([proto], "one", [], [], initializer=[tensor])
    new_nodes = quantizer.quantize_matmul(proto, [graph])
    assert len(new_nodes) == 1 and new_nodes[0].op_type == "MatMulNBits", new_nodes
    new_node = onnx.NodeProto()
    new_node.CopyFrom(new_nodes[0])
    tensors = [ir.Tensor(np.array(onnx.numpy_helper.to_array(t)), name=t.name)
               for t in graph.initializer if t.name != weight.name]  # fmt: skip
    return new_node, tensors


def _quantize_one(quantizer: Any, node: ir.Node) -> tuple[onnx.NodeProto, list[ir.Tensor]]:
    """:func:`_quantize_columns` on ``node``'s whole weight, or, where its fp32 copy passes
    protobuf's 2 GB message limit (the 7B LM head: 3584 x 152064, 2.2 GB), on slices of at most
    ``PROTO_BYTES`` of columns. ORT quantizes each column (output feature) on its own and lays
    its tensors out column by column, so the slices' tensors joined along their first axis are
    the whole weight's, byte for byte (tested)."""
    weight = node.inputs[1]
    assert weight is not None and weight.const_value is not None
    array = np.ascontiguousarray(weight.const_value.numpy())  # the lazy cast runs here
    if array.nbytes <= PROTO_BYTES:
        return _quantize_columns(quantizer, node, array)
    rows, cols = array.shape
    width = max(1, PROTO_BYTES // (rows * array.itemsize))
    parts = [_quantize_columns(quantizer, node, np.ascontiguousarray(array[:, i : i + width]))
             for i in range(0, cols, width)]  # fmt: skip
    del array
    new_node = parts[0][0]
    for attribute in new_node.attribute:
        if attribute.name == "N":
            attribute.i = cols
    joined = [ir.Tensor(np.concatenate([p[1][i].numpy() for p in parts]), name=t.name)
              for i, t in enumerate(parts[0][1])]  # fmt: skip
    return new_node, joined


def streaming_to_nbits(builder: Any, fallback: Any) -> ir.Model:
    """``Model.to_nbits``, one ``MatMul`` at a time (see the module docstring)."""
    if not _plain_rtn(builder):
        return fallback(builder)
    attrs = builder.quant_attrs
    quantizer = DefaultWeightOnlyQuantizer(DefaultWeightOnlyQuantConfig(
        block_size=attrs["matmul_block_size"], is_symmetric=attrs["is_symmetric"],
        accuracy_level=attrs["accuracy_level"], op_types_to_quantize=("MatMul",),
        bits=attrs["bits"]))  # fmt: skip
    model, excluded = builder.model, set(attrs["nodes_to_exclude"])
    graph = model.graph
    for node in list(graph):
        weight = node.inputs[1] if node.op_type == "MatMul" and len(node.inputs) == 2 else None
        if node.domain not in ("", "ai.onnx") or node.name in excluded or weight is None:
            continue
        if weight.const_value is None or len(weight.const_value.shape) != 2:
            continue  # what ORT's pass leaves alone: activations times activations, N-D weights
        proto, tensors = _quantize_one(quantizer, node)
        inputs: list[ir.Value | None] = [node.inputs[0]]
        for const in tensors:
            value = ir.Value(name=const.name, shape=const.shape, type=ir.TensorType(const.dtype),
                             const_value=const)  # fmt: skip
            graph.register_initializer(value)
            inputs.append(value)
        attributes = {a.name: onnx.helper.get_attribute_value(a) for a in proto.attribute}
        new = ir.Node(proto.domain, proto.op_type, inputs, ir.convenience.convert_attributes(attributes),
                      name=proto.name, num_outputs=1)  # fmt: skip
        old = node.outputs[0]
        new.outputs[0].shape, new.outputs[0].type = old.shape, old.type
        old_name, old.name = old.name, f"{old.name}.float"
        new.outputs[0].name = old_name
        graph.insert_after(node, new)
        ir.convenience.replace_all_uses_with(old, new.outputs[0], replace_graph_outputs=True)
        graph.remove(node, safe=True)
        if not weight.uses():
            graph.initializers.pop(weight.name)  # the fp32 weight goes now, not at the end
    model.opset_imports.setdefault("com.microsoft", 1)
    return model


def main(argv: list[str]) -> int:
    watch = MemoryWatch()
    sys.argv = ["onnxruntime_genai.models.builder", *argv]
    import onnxruntime_genai.models  # type: ignore[import-untyped]  # noqa: F401  (puts the builder's modules on sys.path)
    # the builder imports its own modules by top-level names (``builders.base``), not as
    # ``onnxruntime_genai.models.builders.base``: patch the class it will use
    Model = importlib.import_module("builders.base").Model

    original = Model.to_nbits
    Model.to_nbits = lambda self: streaming_to_nbits(self, original)
    start = time.perf_counter()
    try:
        runpy.run_module("onnxruntime_genai.models.builder", run_name="__main__")
    finally:
        Model.to_nbits = original
    record = {**watch.stop(), "seconds": round(time.perf_counter() - start, 1)}
    if "-o" in argv:
        out = Path(argv[argv.index("-o") + 1])
        (out / MEMORY_FILE).write_text(json.dumps(record) + "\n")
    print(f"builder memory: {record}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
