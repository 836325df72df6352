"""The opt-in int8 image encoder (``conceptseg export --parts sam3_vision_int8``) on the tiny
engines: its manifest and parity figures, the pipeline with it against fp32 (same answer, mask IoU
>= 0.95 on random weights), the served repository pointing at it, and every misuse refused.

Run: .venv/bin/pytest tests/models/test_sam3_int8.py -q
"""

from __future__ import annotations

import json
import shutil

import pytest

from conceptseg.build import build_pipeline
from conceptseg.cli import main
from conceptseg.config import from_name
from conceptseg.masks import iou
from conceptseg.samples import sample_request
from conceptseg.types import RequestError

CONFIG = from_name("test", max_new_tokens=6, router=False)


@pytest.fixture(scope="module")
def engines(tiny_weights, tiny_engines, tmp_path_factory):
    """The tiny engines (linked; the manifest and the vision graph copied: the export rewrites
    one and onnx refuses external data behind a link) plus the int8 vision graph."""
    out = tmp_path_factory.mktemp("int8")
    for path in tiny_engines.iterdir():
        if path.name == "manifest.json" or path.name.startswith("sam3_vision."):
            shutil.copy2(path, out / path.name)
        else:
            (out / path.name).symlink_to(path)
    argv = [
        "export",
        "--weights",
        str(tiny_weights),
        "--out",
        str(out),
        "--parts",
        "sam3_vision_int8",
    ]
    assert main(argv) == 0
    return out


def test_manifest_and_parity(engines):
    record = json.loads((engines / "sam3_vision.int8.json").read_text())
    fp32 = json.loads((engines / "sam3_vision.json").read_text())
    assert record["inputs"] == fp32["inputs"] and record["outputs"] == fp32["outputs"]
    assert set(record["parity_vs_fp32_graph"]) == {t["name"] for t in fp32["outputs"]}
    worst = max(v["relative_l2"] for v in record["parity_vs_fp32_graph"].values())
    assert 0 < worst < 0.05, record["parity_vs_fp32_graph"]  # quantized, and close
    manifest = json.loads((engines / "manifest.json").read_text())
    assert manifest["graphs"]["sam3_vision.int8"] == "sam3_vision.int8.json"
    assert "sam3_vision" in manifest["graphs"], "the fp32 entries are kept"


def test_pipeline_with_int8_vision_matches_fp32(tiny_weights, engines):
    request = sample_request()
    runs = {}
    for precision in ("fp32", "int8"):
        pipeline = build_pipeline(tiny_weights, backend="onnxruntime", engines=engines,
                                  config=CONFIG, sam3_precision=precision)  # fmt: skip
        runs[precision] = pipeline.run(request)
        assert pipeline.versions["sam3_precision"] == precision
    fp32, int8 = runs["fp32"], runs["int8"]
    assert int8.route == fp32.route == "reason" and int8.text == fp32.text
    overlap = iou(int8.mask, fp32.mask)
    print(f"\nint8 vs fp32 image encoder: mask IoU {overlap:.4f}")
    assert overlap >= 0.95


def test_misuse_is_refused(tiny_weights, tiny_engines, engines, tmp_path):
    with pytest.raises(RequestError, match=r"--sam3-precision: 'int8' is not one of \('fp32', 'bf16'\) for --backend torch"):
        build_pipeline(tiny_weights, sam3_precision="int8")
    with pytest.raises(RequestError, match="--parts sam3_vision_int8"):
        build_pipeline(
            tiny_weights, backend="onnxruntime", engines=tiny_engines, sam3_precision="int8"
        )
    with pytest.raises(RequestError, match="'int4' is not one of"):
        build_pipeline(tiny_weights, backend="onnxruntime", engines=engines, sam3_precision="int4")
    lone = tmp_path / "lone"
    lone.mkdir()
    argv = [
        "export",
        "--weights",
        str(tiny_weights),
        "--out",
        str(lone),
        "--parts",
        "sam3_vision_int8",
    ]
    assert main(argv) == 2, "nothing to quantize without sam3_vision.onnx"


def test_served_repository_runs_the_int8_graph(engines, tmp_path):
    from conceptseg.serving import repository as ft

    opts = ft.RepoOptions(sam3_precision="int8")
    repo = ft.build_repository("cpu", engines, tmp_path / "cpu", opts)
    assert ft.validate_repository(repo, engines, "cpu") == []
    config = ft.parse_config(repo / "sam3_vision" / "config.pbtxt")
    assert config.parameters["graph"].string_value == "sam3_vision.int8"
    assert config.parameters["runtime"].string_value == "onnxruntime", "ONNX Runtime's int8 ops"
    assert (
        ft.parse_config(repo / "sam3_heads" / "config.pbtxt").parameters["graph"].string_value
        == "sam3_heads"
    )
    checkpoint = tmp_path / "trtllm-fp8"
    checkpoint.mkdir()
    gpu = ft.RepoOptions(sam3_precision="int8", mllm_path=checkpoint)
    with pytest.raises(ft.TemplateError, match="for the cpu profile; TensorRT plans"):
        ft.model_values("gpu", engines, gpu, plans=tmp_path)


def test_re_exporting_the_fp32_encoder_drops_the_stale_int8_one(tiny_weights, engines, tmp_path):
    out = tmp_path / "again"
    out.mkdir()
    for path in engines.glob("sam3_vision*"):
        shutil.copy2(path, out / path.name)
    shutil.copy2(engines / "manifest.json", out / "manifest.json")
    argv = ["export", "--weights", str(tiny_weights), "--out", str(out), "--parts", "sam3_vision"]
    assert main(argv) == 0
    assert not list(out.glob("sam3_vision.int8*")), "quantized from the replaced graph"
    assert "sam3_vision.int8" not in json.loads((out / "manifest.json").read_text())["graphs"]
