"""``conceptseg bench attention``: one global attention block of the SAM 3 ViT (16 heads x 5184 tokens x
64 at 1008 px), three ways under ONNX Runtime, side by side: as exported (MatMul, Softmax,
MatMul), as the ONNX ``Attention`` op (opset 23) and as ``com.microsoft.MultiHeadAttention``.
Tells whether fusing the attention would speed up the vision graph on this machine.
"""

from __future__ import annotations

import argparse
from typing import Any

import numpy as np

from conceptseg.benchmark import RUNNERS, row, side_by_side, summary


def graphs(heads: int, tokens: int, dim: int) -> dict[str, Any]:
    """name -> ONNX model; inputs q, k, v and output o, (1, heads, tokens, dim) except the
    contrib op's (1, tokens, heads * dim) layout."""
    from onnx import TensorProto, helper

    def io(name: str, shape: list[int]) -> Any:
        return helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)

    def model(nodes: list, shape: list[int], opsets: list, inits: tuple = ()) -> Any:
        graph = helper.make_graph(nodes, "attention", [io(n, shape) for n in "qkv"],
                                  [io("o", shape)], list(inits))  # fmt: skip
        built = helper.make_model(
            graph, opset_imports=[helper.make_opsetid(d, v) for d, v in opsets]
        )
        built.ir_version = 10  # what ONNX Runtime 1.31 reads
        return built

    bhsd, bsh = [1, heads, tokens, dim], [1, tokens, heads * dim]
    scale = helper.make_tensor("scale", TensorProto.FLOAT, [], [dim**-0.5])
    decomposed = [
        helper.make_node("Transpose", ["k"], ["kt"], perm=[0, 1, 3, 2]),
        helper.make_node("MatMul", ["q", "kt"], ["s"]),
        helper.make_node("Mul", ["s", "scale"], ["scaled"]),
        helper.make_node("Softmax", ["scaled"], ["p"], axis=-1),
        helper.make_node("MatMul", ["p", "v"], ["o"]),
    ]
    return {
        "decomposed": model(decomposed, bhsd, [("", 18)], (scale,)),
        "onnx_attention_23": model([helper.make_node("Attention", ["q", "k", "v"], ["o"])], bhsd,
                                   [("", 23)]),
        "ort_multihead_attention": model(
            [helper.make_node("MultiHeadAttention", ["q", "k", "v"], ["o"],
                              domain="com.microsoft", num_heads=heads)],
            bsh, [("", 18), ("com.microsoft", 1)]),
    }  # fmt: skip


def bench_attention(args: argparse.Namespace, side_by_side: Any, summary: Any, runner: Any) -> dict:
    import onnxruntime as ort

    heads, tokens, dim = 16, args.tokens or 5184, 64
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((1, heads, tokens, dim)).astype(np.float32) for _ in range(3))
    flat = {
        n: x.transpose(0, 2, 1, 3).reshape(1, tokens, heads * dim)
        for n, x in zip("qkv", (q, k, v), strict=True)
    }
    options = ort.SessionOptions()
    options.intra_op_num_threads = args.threads
    contenders = {}
    for name, model in graphs(heads, tokens, dim).items():
        session = ort.InferenceSession(
            model.SerializeToString(), options, providers=["CPUExecutionProvider"]
        )
        feeds = flat if name == "ort_multihead_attention" else {"q": q, "k": k, "v": v}

        def run(
            s: Any = session, f: dict = feeds, contrib: bool = name == "ort_multihead_attention"
        ) -> np.ndarray:
            out = s.run(None, f)[0]
            return out.reshape(1, tokens, heads, dim).transpose(0, 2, 1, 3) if contrib else out

        contenders[name] = run
    result = side_by_side(contenders, args.repeats, args.warmup, runner)
    base = result["outputs"]["decomposed"]
    return {f"attention/{name}": summary(times) | {
                "max_abs_vs_decomposed": float(np.abs(result["outputs"][name] - base).max())}
            for name, times in result["times"].items()}  # fmt: skip


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--tokens", type=int, default=0, help="5184 (1008 px) if 0"
    )


def run(args: argparse.Namespace) -> dict[str, Any]:
    return bench_attention(args, side_by_side, summary, RUNNERS[args.runner])


def rows(results: dict[str, Any]) -> list[dict[str, Any]]:
    return [row(*key.split("/", 1), r, max_abs=r["max_abs_vs_decomposed"])
            for key, r in results.items()]  # fmt: skip
