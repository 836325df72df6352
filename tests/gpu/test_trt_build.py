"""TensorRT build + verification on a tiny in-process ONNX graph (needs TensorRT and a CUDA GPU).

Skips itself, with the reason printed under ``-ra``, where ``tensorrt`` is not importable or no
CUDA device is visible. Marked ``gpu``: the default run collects it (and reports the skip),
``-m gpu`` selects it on a GPU machine.

    pip install "$(python -m conceptseg.gpu_stack pip tensorrt)"   # on the GPU machine, once
    # (or run it in the deployment image, docker/Dockerfile, which has it)

Run: .venv/bin/pytest tests/gpu/test_trt_build.py -q -ra -m gpu
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from conceptseg.backends.trt import TENSORRT_PIN

trt = pytest.importorskip(
    "tensorrt",
    reason=f"TensorRT is not importable (pip install tensorrt=={TENSORRT_PIN} on a GPU machine)",
    exc_type=ImportError,  # also a wheel whose CUDA libraries fail to load
)
torch = pytest.importorskip("torch", reason="torch is needed for the CUDA buffers")
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        not torch.cuda.is_available(),
        reason="no CUDA GPU visible to torch: TensorRT engines need one",
    ),
]

import onnx  # noqa: E402
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from conceptseg.backends.trt import TensorRTSession  # noqa: E402
from conceptseg_export import trt_build  # noqa: E402
from conceptseg_export.trt_build import BuildConfig, BuildError  # noqa: E402

WIDTH = 8


def _ctm_like(directory: Path, extra_node: onnx.NodeProto | None = None) -> Path:
    """``ctm.onnx``: concept (B, WIDTH) = masked mean of hidden (B, S, WIDTH) @ W, + ``ctm.json``."""
    rng = np.random.default_rng(0)
    weight = rng.standard_normal((WIDTH, WIDTH)).astype(np.float32)
    nodes = [
        helper.make_node("Cast", ["key_mask"], ["m"], to=TensorProto.FLOAT),
        helper.make_node("Unsqueeze", ["m", "axis2"], ["m3"]),
        helper.make_node("Mul", ["hidden", "m3"], ["masked"]),
        helper.make_node("ReduceSum", ["masked", "axis1"], ["total"], keepdims=0),
        helper.make_node("ReduceSum", ["m3", "axis1"], ["count"], keepdims=0),
        helper.make_node("Div", ["total", "count"], ["mean"]),
        helper.make_node("MatMul", ["mean", "W"], ["concept"]),
    ]
    if extra_node is not None:
        nodes.append(extra_node)
    inits = [
        helper.make_tensor("axis1", TensorProto.INT64, [1], [1]),
        helper.make_tensor("axis2", TensorProto.INT64, [1], [2]),
        helper.make_tensor("W", TensorProto.FLOAT, [WIDTH, WIDTH], weight.ravel()),
    ]
    graph = helper.make_graph(
        nodes,
        "ctm",
        [
            helper.make_tensor_value_info("hidden", TensorProto.FLOAT, ["batch", "seq", WIDTH]),
            helper.make_tensor_value_info("key_mask", TensorProto.INT64, ["batch", "seq"]),
        ],
        [helper.make_tensor_value_info("concept", TensorProto.FLOAT, ["batch", WIDTH])],
        inits,
    )
    directory.mkdir(parents=True, exist_ok=True)
    # IR 10 (ONNX 1.17): onnx 1.23's default IR 14 is newer than onnxruntime 1.31 (max 13) reads
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=10)
    onnx.save(model, str(directory / "ctm.onnx"))
    manifest = {
        "inputs": [
            {"name": "hidden", "shape": ["batch", "seq", WIDTH], "dtype": "float32"},
            {"name": "key_mask", "shape": ["batch", "seq"], "dtype": "int64"},
        ],
        "outputs": [{"name": "concept", "shape": ["batch", WIDTH], "dtype": "float32"}],
        "opset": 18,
    }
    (directory / "ctm.json").write_text(json.dumps(manifest))
    return directory


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("trt")
    cfg = BuildConfig(onnx=_ctm_like(root / "engines" / "tiny"), workspace_gb=1.0)
    out = trt_build.main(cfg)
    return out, json.loads((out / "ctm.plan.json").read_text())


def test_plan_manifest_and_verification(built):
    out, manifest = built
    assert (out / "ctm.plan").stat().st_size > 0
    assert [p["name"] for p in manifest["profiles"]] == [
        "latency_seq128",
        "latency_seq256",
        "latency_seq512",
        "latency_seq768",
        "throughput",
    ]
    assert manifest["tensorrt_version"] == trt.__version__ and manifest["gpu"] != "unknown"
    assert len(manifest["source_onnx_sha256"]) == 64
    assert {t["name"] for t in manifest["inputs"]} == {"hidden", "key_mask"}
    verification = manifest["verification"]
    assert verification["passed"], json.dumps(verification, indent=2)
    assert tuple(verification["limits"]["elementwise"]) == (1e-3, 1e-4)
    assert len(verification["runs"]) == 5, "every profile is verified at its opt shapes"


def test_session_picks_profiles_and_matches_numpy(built):
    out, _ = built
    session = TensorRTSession(out / "ctm.plan")
    assert session.profile_names[-1] == "throughput"
    inits = onnx.load(str(out.parent / "ctm.onnx")).graph.initializer
    weight = next(numpy_helper.to_array(t) for t in inits if t.name == "W")
    rng = np.random.default_rng(1)
    for batch, seq in ((1, 256), (3, 300)):  # an exact latency bucket, then the throughput range
        hidden = rng.standard_normal((batch, seq, WIDTH)).astype(np.float32)
        mask = np.ones((batch, seq), np.int64)
        mask[:, seq // 2 :] = 0
        got = session.run({"hidden": hidden, "key_mask": mask})["concept"]
        expected = hidden[:, : seq // 2].mean(axis=1) @ weight
        np.testing.assert_allclose(got, expected, rtol=1e-3, atol=1e-4)


def test_timing_cache_is_saved_and_reused(built, caplog):
    out, manifest = built
    cache = Path(manifest["timing_cache"])
    assert cache.is_file() and cache.stat().st_size > 0
    with caplog.at_level("INFO"):
        trt_build.main(BuildConfig(onnx=out.parent, out=out.parent / "again", verify=False))
    assert "loaded" in caplog.text


def test_parser_errors_fail_loudly(tmp_path, caplog):
    custom = helper.make_node("NoSuchOp", ["concept"], ["extra"], domain="com.example")
    directory = _ctm_like(tmp_path / "bad", extra_node=custom)
    with pytest.raises(BuildError, match="parser failed"), caplog.at_level("ERROR"):
        trt_build.main(BuildConfig(onnx=directory, verify=False))
    assert "parser error 1/" in caplog.text, "every parser error is logged with its node"
