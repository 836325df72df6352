"""The GPU stack written down once (``conceptseg/gpu_stack.toml``) and what reads it: no other
version literal of its components, the Dockerfile's base, the Python range, the plan records
(TensorRT version, external-weight hashes, precision labels), CTM profile coverage, AutoCast's
calibration inputs, verification statistics, and ``serve --profile gpu`` refusing other plans.

Run: .venv/bin/pytest tests/unit/test_gpu_stack.py -q
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import numpy as np
import pytest

from conceptseg import gpu_stack
from conceptseg.backends.trt import pick_profile
from conceptseg.config import PipelineConfig
from conceptseg.models.engines import CTM_BUCKETS, bucket
from conceptseg.types import RequestError
from conceptseg_export import trt_build, trt_verify
from conceptseg_export.trt_build import BuildConfig, BuildError, profiles_for

ROOT = Path(__file__).resolve().parents[2]
STACK = gpu_stack.load()
# files that may spell the stack's versions: the stack itself; the Dockerfile's ARG default is
# checked equal to it below; this file names the old pins; the op table names its TensorRT
# the chart's and KServe's image tags are checked equal to gpu_stack's image by tests/deploy
ALLOWED = {"runtime/conceptseg/gpu_stack.toml", "docker/Dockerfile", "tests/unit/test_gpu_stack.py",
           "deploy/helm/conceptseg/Chart.yaml", "deploy/helm/conceptseg/values.yaml",
           "deploy/kserve/servingruntime.yaml"}  # fmt: skip
OLD_PINS = ("11.1.0.106", "0.47.0")  # the TensorRT and ModelOpt pins before the stack


def _tracked_files() -> list[Path]:
    out = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT,
                         capture_output=True, text=True, check=True).stdout  # fmt: skip
    return [ROOT / f for f in out.split() if (ROOT / f).is_file()]


def test_no_other_file_spells_a_stack_version():
    values = {STACK.release, STACK.triton_server, STACK.triton_image, *STACK.components.values(), *OLD_PINS}
    values.discard(STACK["python"].rsplit(".", 1)[0])
    pattern = re.compile("|".join(rf"(?<![\w.]){re.escape(v)}(?![\w])" for v in values))
    found = []
    for path in _tracked_files():
        rel = str(path.relative_to(ROOT))
        if rel in ALLOWED or path.suffix in (".png", ".jpg", ".npz", ".onnx", ".safetensors"):
            continue
        text = path.read_text(errors="ignore")
        if rel == "export/conceptseg_export/trt_supported_ops.json":
            text = json.dumps({k: v for k, v in json.loads(text).items() if k not in ("tensorrt_version", "source")})
        found += [f"{rel}: {m.group(0)}" for m in pattern.finditer(text)]
    assert not found, f"read these from conceptseg.gpu_stack instead: {found}"


def test_the_dockerfile_builds_from_the_stacks_release():
    text = (ROOT / "docker" / "Dockerfile").read_text()
    default = re.search(r"^ARG TRITON_IMAGE=(\S+)$", text, re.M).group(1)
    assert default == STACK.triton_image and "FROM ${TRITON_IMAGE}" in text
    assert STACK.triton_image.endswith(f":{STACK.release}-trtllm-python-py3")


def test_requires_python_admits_the_containers_python():
    spec = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["requires-python"]
    from packaging.specifiers import SpecifierSet

    assert STACK["python"] in SpecifierSet(spec) and "3.11.9" in SpecifierSet(spec), spec


def test_stack_cli_prints_one_value():
    run = subprocess.run([sys.executable, "-m", "conceptseg.gpu_stack", "pip", "tensorrt"],
                         capture_output=True, text=True, check=True)  # fmt: skip
    assert run.stdout.strip() == f"tensorrt=={STACK['tensorrt']}"


def test_ctm_profiles_hold_every_completion_length():
    manifest = {"inputs": [{"name": "hidden", "shape": ["batch", "seq", 8], "dtype": "float32"},
                           {"name": "key_mask", "shape": ["batch", "seq"], "dtype": "int64"}],
                "outputs": []}  # fmt: skip
    ranges = [{n: s for n, s in p.shapes.items()} for p in profiles_for("ctm", manifest)]
    for n in range(1, PipelineConfig().max_length + 1):
        seq = bucket(n, CTM_BUCKETS)
        pick_profile(ranges, {"hidden": (1, seq, 8), "key_mask": (1, seq)})  # raises if none fits


def test_plan_records_hash_the_external_weights(tmp_path):
    (tmp_path / "g.onnx").write_bytes(b"graph")
    assert list(trt_build.graph_hashes(tmp_path / "g.onnx")) == ["g.onnx"]
    (tmp_path / "g.onnx.data").write_bytes(b"weights")
    hashes = trt_build.graph_hashes(tmp_path / "g.onnx")
    assert set(hashes) == {"g.onnx", "g.onnx.data"} and len(set(hashes.values())) == 2


def test_fp8_is_labelled_with_the_precision_of_its_other_ops(tmp_path):
    assert BuildConfig(onnx=tmp_path, fp8=True).label == "fp8+fp32"
    with pytest.raises(BuildError, match="other ops stay fp32"):
        BuildConfig(onnx=tmp_path, fp8=True, precision="fp16")


def test_autocast_is_calibrated_on_the_exports_sample_inputs(tmp_path):
    fake = tmp_path / "fake_python"
    log = tmp_path / "argv.json"
    fake.write_text(f"#!{sys.executable}\nimport json, sys\nargv = sys.argv[1:]\n"
                    f"json.dump(argv, open({str(log)!r}, 'w'))\n"
                    "open(argv[argv.index('--output_path') + 1], 'wb').write(b'x')\n")  # fmt: skip
    fake.chmod(0o755)
    src = tmp_path / "ctm.onnx"
    src.write_bytes(b"onnx")
    cfg = BuildConfig(onnx=tmp_path, precision="fp16", autocast_python=fake)
    cfg.out.mkdir()
    with pytest.raises(BuildError, match="ctm.sample.npz"):
        trt_build.to_strongly_typed_source(src, cfg)
    np.savez(tmp_path / "ctm.sample.npz", hidden=np.ones((1, 128, 8), np.float32))
    assert trt_build.to_strongly_typed_source(src, cfg) == cfg.out / "ctm.fp16.onnx"
    argv = json.loads(log.read_text())
    assert argv[argv.index("--calibration_data") + 1] == str(tmp_path / "ctm.sample.npz")


def _graph(path: Path, dtype: str) -> None:
    """y = tanh(x @ w1) @ w2 (x: (B, 32)), in fp32, or in fp16 between fp32 casts."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    w1, w2 = rng.standard_normal((2, 32, 32)).astype(np.float32) / 4
    low = dtype == "fp16"
    cast = np.float16 if low else np.float32
    inits = [numpy_helper.from_array(w.astype(cast), n) for w, n in ((w1, "w1"), (w2, "w2"))]
    nodes = [helper.make_node("Cast", ["x"], ["xl"], to=TensorProto.FLOAT16 if low else TensorProto.FLOAT),
             helper.make_node("MatMul", ["xl", "w1"], ["h"]), helper.make_node("Tanh", ["h"], ["t"]),
             helper.make_node("MatMul", ["t", "w2"], ["yl"]),
             helper.make_node("Cast", ["yl"], ["semantic_logits"], to=TensorProto.FLOAT)]  # fmt: skip
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 32])],
                              [helper.make_tensor_value_info("semantic_logits", TensorProto.FLOAT, ["batch", 32])],
                              initializer=inits)  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    onnx.save(model, str(path))


class OrtAsPlan:
    """ONNX Runtime on the fp16 graph, standing in for an fp16 TensorRT plan."""

    def __init__(self, path: Path) -> None:
        import onnxruntime as ort

        self.session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])

    def run(self, feeds, profile=None):
        return dict(zip(["semantic_logits"], self.session.run(None, feeds), strict=True))


def test_reduced_precision_is_verified_on_statistics_not_every_element(tmp_path):
    _graph(tmp_path / "g.onnx", "fp32")
    _graph(tmp_path / "g16.onnx", "fp16")
    manifest = {"inputs": [{"name": "x", "shape": ["batch", 32], "dtype": "float32"}],
                "outputs": [{"name": "semantic_logits", "shape": ["batch", 32], "dtype": "float32"}]}  # fmt: skip
    np.savez(tmp_path / "g.sample.npz", x=np.linspace(-3, 3, 64, dtype=np.float32).reshape(2, 32))
    cases = [("throughput", {"x": (64, 32)})]
    plan = OrtAsPlan(tmp_path / "g16.onnx")
    args = (None, tmp_path / "g.onnx", manifest, cases)
    fp16 = trt_verify.check_against_onnxruntime(*args, trt_verify.LIMITS["fp16"],
                                                sample=tmp_path / "g.sample.npz", session=plan)  # fmt: skip
    assert fp16["passed"], fp16
    assert [r["inputs"] for r in fp16["runs"]] == ["sample", "random0"]
    stats = fp16["runs"][1]["outputs"]["semantic_logits"]
    assert 0 < stats["p999_rel"] <= stats["max_rel"] and stats["mask_iou"] > 0.98
    strict = trt_verify.check_against_onnxruntime(*args, trt_verify.LIMITS["fp32"], session=plan)
    assert not strict["passed"], "fp16 is not fp32: the elementwise fp32 limits must catch it"


def test_serve_gpu_refuses_plans_of_another_tensorrt(tmp_path):
    from conceptseg.serving.server import check_plan_tensorrt

    record = {"graph": "ctm", "tensorrt_version": STACK["tensorrt"]}
    (tmp_path / "ctm.plan.json").write_text(json.dumps(record))
    check_plan_tensorrt(tmp_path)
    other = "9.9.9"
    (tmp_path / "sam3_text.plan.json").write_text(json.dumps({**record, "tensorrt_version": other}))
    with pytest.raises(RequestError) as info:
        check_plan_tensorrt(tmp_path)
    message = str(info.value)
    assert "\n" not in message and other in message and STACK["tensorrt"] in message
    assert "build-engines" in message


def test_tensorrt_of_another_major_is_refused_with_the_stacks_version(monkeypatch):
    from types import SimpleNamespace

    from conceptseg.backends import trt

    monkeypatch.setitem(sys.modules, "tensorrt", SimpleNamespace(__version__="11.1.0"))
    with pytest.raises(trt.TensorRTUnavailable, match=f"TensorRT {STACK.tensorrt_major} API"):
        trt.import_tensorrt()


def test_build_refuses_a_tensorrt_that_is_not_the_containers(tmp_path, monkeypatch):
    manifest = {"inputs": [{"name": "x", "shape": ["batch", 4], "dtype": "float32"}],
                "outputs": [{"name": "y", "shape": ["batch", 4], "dtype": "float32"}]}  # fmt: skip
    (tmp_path / "ctm.onnx").write_bytes(b"")
    (tmp_path / "ctm.json").write_text(json.dumps(manifest))
    from types import SimpleNamespace

    monkeypatch.setattr(trt_build, "import_tensorrt", lambda: SimpleNamespace(__version__="10.0.0"))
    with pytest.raises(BuildError, match="--any-tensorrt"):
        trt_build.main(BuildConfig(onnx=tmp_path))
    assert not (tmp_path / "trt-fp32").exists(), "refused before anything is written"
