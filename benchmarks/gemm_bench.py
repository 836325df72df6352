"""``conceptseg bench gemm``: one prefill-shaped GEMM of the 3B decoder (the MLP's up projection, tokens x
2048 x 11008), as ONNX Runtime and torch run it on this CPU, side by side: ONNX Runtime fp32
MatMul, ONNX Runtime int4 MatMulNBits (block 32, symmetric; accuracy level 1 = fp32 compute, 4 =
int8 compute, as the ort-genai export) and torch fp32 / bf16 matmul. Says where the int4 path's
prefill time goes.
"""

from __future__ import annotations

import argparse
from typing import Any

import numpy as np

from conceptseg.benchmark import RUNNERS, row, side_by_side, summary


def bench_gemm(args: argparse.Namespace, side_by_side: Any, summary: Any, runner: Any) -> dict:
    import onnx
    import onnxruntime as ort
    import torch
    from onnx import TensorProto, helper, numpy_helper
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    m, k, n = args.tokens or 1144, 2048, 11008
    rng = np.random.default_rng(0)
    weight = (rng.standard_normal((k, n)) * 0.02).astype(np.float32)
    x = rng.standard_normal((1, m, k)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])], "gemm",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, m, k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, m, n])],
        [numpy_helper.from_array(weight, "w")],
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 10
    options = ort.SessionOptions()
    options.intra_op_num_threads = args.threads
    models = {"ort_fp32": model}
    for level in (1, 4):
        quantizer = MatMulNBitsQuantizer(onnx.load_from_string(model.SerializeToString()),
                                         block_size=32, is_symmetric=True, accuracy_level=level)  # fmt: skip
        quantizer.process()
        models[f"ort_int4_acc{level}"] = quantizer.model.model
    contenders = {}
    for name, graph_model in models.items():
        session = ort.InferenceSession(graph_model.SerializeToString(), options,
                                       providers=["CPUExecutionProvider"])  # fmt: skip
        contenders[name] = lambda s=session: s.run(None, {"x": x})[0]
    torch.set_num_threads(args.threads)
    for dtype, name in ((torch.float32, "torch_fp32"), (torch.bfloat16, "torch_bf16")):
        xt, wt = torch.from_numpy(x).to(dtype), torch.from_numpy(weight).to(dtype)
        contenders[name] = lambda a=xt, b=wt: (a @ b).float().numpy()
    result = side_by_side(contenders, args.repeats, args.warmup, runner)
    ref = result["outputs"]["ort_fp32"]
    flops = 2 * m * k * n
    rows = {}
    for name, times in result["times"].items():
        stats = summary(times)
        out = result["outputs"][name]
        rows[f"gemm/{name}"] = stats | {
            "gflops": flops / (stats["median_ms"] / 1e3) / 1e9,
            "relative_l2_vs_fp32": float(np.linalg.norm(out - ref) / np.linalg.norm(ref)),
        }
    return rows


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tokens", type=int, default=0, help="GEMM rows (0: 1144, the 3B prompt)")


def run(args: argparse.Namespace) -> dict[str, Any]:
    return bench_gemm(args, side_by_side, summary, RUNNERS[args.runner])


def rows(results: dict[str, Any]) -> list[dict[str, Any]]:
    return [row(*key.split("/", 1), r, gflops=r["gflops"], rel_l2=r["relative_l2_vs_fp32"])
            for key, r in results.items()]  # fmt: skip
