"""``build-engines`` without a GPU: CLI generated from the dataclass, profile rules from exporter
manifests, verification inputs and comparison, profile choice, and the missing-TensorRT error.

Run: .venv/bin/pytest tests/unit/test_trt_build_cli.py -q
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from conceptseg.backends.trt import TENSORRT_PIN, pick_profile
from conceptseg_export import trt_build, trt_verify
from conceptseg_export.trt_build import BuildConfig, BuildError, DimRule, profiles_for

# What `conceptseg export` writes for two of the graphs (shapes as in export/onnx_export.py).
HEADS = {
    "inputs": [
        {"name": "fpn0", "shape": ["batch", 256, 288, 288], "dtype": "float32"},
        {"name": "prompt", "shape": ["batch", 40, 256], "dtype": "float32"},
        {"name": "prompt_mask", "shape": ["batch", 40], "dtype": "int64"},
        {"name": "boxes", "shape": ["batch", 1, 4], "dtype": "float32"},
        {"name": "box_labels", "shape": ["batch", 1], "dtype": "int64"},
    ],
    "outputs": [{"name": "presence_logits", "shape": ["batch", 1], "dtype": "float32"}],
    "opset": 18,
}
CTM = {
    "inputs": [
        {"name": "hidden", "shape": ["batch", "seq", 64], "dtype": "float32"},
        {"name": "key_mask", "shape": ["batch", "seq"], "dtype": "int64"},
    ],
    "outputs": [{"name": "concept", "shape": ["batch", 8, 256], "dtype": "float32"}],
    "opset": 18,
}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser()
    trt_build.add_cli_args(parser)
    return parser


def test_cli_flags_come_from_the_dataclass_fields():
    argv = (
        "--onnx engines/x --precision fp32 --fp8 --workspace-gb 2.5 --no-verify --timing-cache "
        "cache.bin --graphs ctm sam3_text --autocast-python /opt/modelopt/bin/python"
    )
    args = _parser().parse_args(argv.split())
    cfg = trt_build.from_cli_args(args)
    assert cfg.onnx == Path("engines/x") and cfg.precision == "fp32" and cfg.fp8
    assert cfg.workspace_gb == 2.5 and cfg.verify is False and cfg.graphs == ("ctm", "sam3_text")
    assert cfg.timing_cache == Path("cache.bin")
    assert cfg.autocast_python == Path("/opt/modelopt/bin/python")
    assert cfg.out == Path("engines/x/trt-fp32-fp8"), "default plan directory names the precision"
    assert cfg.limits == trt_verify.LIMITS["fp8"] and cfg.label == "fp8+fp32"


def test_cli_defaults_and_rejections(capsys):
    cfg = trt_build.from_cli_args(_parser().parse_args(["--onnx", "e"]))
    assert (cfg.precision, cfg.fp8, cfg.verify, cfg.graphs) == ("fp32", False, True, ())
    assert cfg.timing_cache == Path("e/timing.cache") and cfg.out == Path("e/trt-fp32")
    assert cfg.limits.elementwise == (1e-3, 1e-4) and cfg.label == "fp32"
    for bad in (["--precision", "fp16"], ["--onnx", "e", "--precision", "int8"]):
        with pytest.raises(SystemExit):
            _parser().parse_args(bad)
    assert "--onnx" in capsys.readouterr().err
    with pytest.raises(BuildError, match="workspace"):
        BuildConfig(onnx=Path("e"), workspace_gb=0)


def test_register_adds_the_subcommand():
    parser = argparse.ArgumentParser(prog="conceptseg")
    sub = parser.add_subparsers(dest="command", required=True)
    trt_build.register(sub)
    args = parser.parse_args(["build-engines", "--onnx", "engines/x", "--precision", "bf16"])
    assert args.func is trt_build.cmd_build_engines
    assert trt_build.from_cli_args(args).precision == "bf16"


def test_batch_only_graph_gets_latency_and_throughput():
    profiles = profiles_for("sam3_heads", HEADS)
    assert [p.name for p in profiles] == ["latency", "throughput"]
    latency, throughput = (p.shapes for p in profiles)
    assert latency["fpn0"] == ((1, 256, 288, 288),) * 3, "latency: min = opt = max at batch 1"
    assert throughput["prompt_mask"] == ((1, 40), (4, 40), (8, 40)), "throughput: batch 1..8, opt 4"


def test_ctm_sequence_is_bucketed_one_latency_profile_per_bucket():
    profiles = profiles_for("ctm", CTM)
    assert [p.name for p in profiles] == [
        "latency_seq128",
        "latency_seq256",
        "latency_seq512",
        "latency_seq768",
        "throughput",
    ]
    assert profiles[1].shapes["key_mask"] == ((1, 256),) * 3
    top = trt_build.CTM_MAX_SEQ
    assert profiles[-1].shapes["hidden"] == ((1, 128, 64), (4, 256, 64), (8, top, 64))


def test_rules_are_data_and_unknown_dims_fail_loudly():
    rules = {**trt_build.DIM_RULES, ("ctm", "seq"): DimRule(latency=(64,), throughput=(32, 64, 96))}
    assert [p.name for p in profiles_for("ctm", CTM, rules)] == ["latency", "throughput"]
    odd = {
        "inputs": [{"name": "x", "shape": ["batch", "tokens"], "dtype": "float32"}],
        "outputs": [],
    }
    with pytest.raises(BuildError, match="DIM_RULES"):
        profiles_for("sam3_text", odd)
    static = {"inputs": [{"name": "x", "shape": [1, 3], "dtype": "float32"}], "outputs": []}
    assert profiles_for("anything", static) == []


def test_random_feeds_follow_the_manifest_and_feed_rules():
    shapes = {n: s[1] for n, s in profiles_for("sam3_heads", HEADS)[1].shapes.items()}  # opt
    shapes["fpn0"] = (4, 256, 8, 8)  # keep the test light
    feeds = trt_verify.random_feeds(HEADS["inputs"], shapes, seed=0)
    assert feeds["fpn0"].shape == (4, 256, 8, 8) and feeds["fpn0"].dtype == np.float32
    assert feeds["prompt_mask"].dtype == np.int64 and feeds["prompt_mask"][:, 0].all()
    assert set(np.unique(feeds["prompt_mask"])) <= {0, 1}
    assert (feeds["box_labels"] == -10).all() and not feeds["boxes"].any()
    again = trt_verify.random_feeds(HEADS["inputs"], shapes, seed=0)
    assert all(np.array_equal(feeds[n], again[n]) for n in feeds), "seeded: reproducible"


def test_compare_applies_rtol_and_atol_elementwise():
    ref = {"y": np.array([1.0, 100.0, 0.0], np.float32)}
    close = {"y": np.array([1.0005, 100.05, 5e-5], np.float32)}
    far = {"y": np.array([1.0, 100.0, 1e-3], np.float32)}
    assert trt_verify.compare(ref, close, rtol=1e-3, atol=1e-4)["y"]["passed"]
    report = trt_verify.compare(ref, far, rtol=1e-3, atol=1e-4)["y"]
    assert not report["passed"] and report["mismatched_fraction"] == pytest.approx(1 / 3)
    shape = trt_verify.compare(ref, {"y": np.zeros(2)}, 1e-3, 1e-4)["y"]
    assert not shape["passed"] and "shape" in shape["error"]


def test_pick_profile_prefers_the_first_range_that_holds_the_shapes():
    ranges = [
        {n: (s[0], s[1], s[2]) for n, s in p.shapes.items()} for p in profiles_for("ctm", CTM)
    ]
    assert pick_profile(ranges, {"hidden": (1, 256, 64), "key_mask": (1, 256)}) == 1
    assert pick_profile(ranges, {"hidden": (3, 300, 64), "key_mask": (3, 300)}) == 4
    with pytest.raises(ValueError, match="no optimisation profile"):
        pick_profile(ranges, {"hidden": (9, 128, 64), "key_mask": (9, 128)})


def test_fp8_needs_explicit_fp8_qdq():
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [4])
    relu = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g", [x], [x])
    assert not trt_build.has_fp8_qdq(helper.make_model(relu))
    scale = helper.make_tensor("s", TensorProto.FLOAT, [], [0.1])
    zero = helper.make_tensor("z", TensorProto.FLOAT8E4M3FN, [], [0])
    qdq = [
        helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"]),
        helper.make_node("DequantizeLinear", ["q", "s", "z"], ["y"]),
    ]
    graph = helper.make_graph(qdq, "g", [x], [x], [scale, zero])
    assert trt_build.has_fp8_qdq(helper.make_model(graph))


def _exported_dir(tmp_path: Path) -> Path:
    """A one-graph engines/NAME directory: ``ctm.onnx`` (a masked mean) + ``ctm.json``."""
    hidden = helper.make_tensor_value_info("hidden", TensorProto.FLOAT, ["batch", "seq", 4])
    mask = helper.make_tensor_value_info("key_mask", TensorProto.INT64, ["batch", "seq"])
    out = helper.make_tensor_value_info("concept", TensorProto.FLOAT, ["batch", 4])
    nodes = [
        helper.make_node("Cast", ["key_mask"], ["m"], to=TensorProto.FLOAT),
        helper.make_node("Unsqueeze", ["m", "axis2"], ["m3"]),
        helper.make_node("Mul", ["hidden", "m3"], ["masked"]),
        helper.make_node("ReduceSum", ["masked", "axis1"], ["total"], keepdims=0),
        helper.make_node("ReduceSum", ["m3", "axis1"], ["count"], keepdims=0),
        helper.make_node("Div", ["total", "count"], ["concept"]),
    ]
    inits = [
        helper.make_tensor("axis1", TensorProto.INT64, [1], [1]),
        helper.make_tensor("axis2", TensorProto.INT64, [1], [2]),
    ]
    graph = helper.make_graph(nodes, "ctm", [hidden, mask], [out], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    onnx.checker.check_model(model)
    directory = tmp_path / "engines" / "tiny"
    directory.mkdir(parents=True)
    onnx.save(model, str(directory / "ctm.onnx"))
    manifest = {
        **CTM,
        "inputs": [{**CTM["inputs"][0], "shape": ["batch", "seq", 4]}, CTM["inputs"][1]],
        "outputs": [{"name": "concept", "shape": ["batch", 4], "dtype": "float32"}],
    }
    (directory / "ctm.json").write_text(json.dumps(manifest))
    return directory


def test_main_without_tensorrt_says_how_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # import tensorrt -> ImportError
    cfg = BuildConfig(onnx=_exported_dir(tmp_path))
    with pytest.raises(BuildError, match=f"pip install tensorrt=={re.escape(TENSORRT_PIN)}"):
        trt_build.main(cfg)
    assert not cfg.out.exists(), "nothing is written before TensorRT is there"


def test_cli_without_tensorrt_prints_one_error_line_not_a_traceback(tmp_path):
    fake = tmp_path / "fake_site" / "tensorrt"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise ImportError('simulated: no TensorRT here')\n")
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(fake.parent), os.environ.get("PYTHONPATH", "")]),
    }
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "conceptseg_export.trt_build",
            "--onnx",
            str(_exported_dir(tmp_path)),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert run.returncode == 1, run.stderr
    assert "Traceback" not in run.stderr, run.stderr
    assert "error: tensorrt: TensorRT is not installed" in run.stderr
    assert f"pip install tensorrt=={TENSORRT_PIN}" in run.stderr


def test_bad_inputs_fail_before_tensorrt(tmp_path):
    with pytest.raises(BuildError, match="not a directory"):
        trt_build.main(BuildConfig(onnx=tmp_path / "missing"))
    directory = _exported_dir(tmp_path)
    with pytest.raises(BuildError, match="--graphs"):
        trt_build.main(BuildConfig(onnx=directory, graphs=("sam3_vision",)))
    with pytest.raises(BuildError, match="FP8 QuantizeLinear"):
        trt_build.main(BuildConfig(onnx=directory, fp8=True))
    (directory / "ctm.json").unlink()
    with pytest.raises(BuildError, match="no manifest"):
        trt_build.main(BuildConfig(onnx=directory))


def test_onnx_runtime_only_int8_graphs_are_not_built(tmp_path):
    directory = _exported_dir(tmp_path)
    (directory / "sam3_vision.int8.onnx").write_bytes((directory / "ctm.onnx").read_bytes())
    assert [p.name for p in trt_build._graph_paths(BuildConfig(onnx=directory))] == ["ctm.onnx"]
    with pytest.raises(BuildError, match="--graphs"):  # nor can they be asked for by name
        trt_build._graph_paths(BuildConfig(onnx=directory, graphs=("sam3_vision.int8",)))
