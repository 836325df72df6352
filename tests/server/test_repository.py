"""Both profiles' repositories generated from the real exported manifests of the tiny engines and
validated (names, shapes, dtypes vs the manifests; gpu also vs ``<graph>.plan.json`` records).
Running the gpu repository needs a GPU and a Triton build with the tensorrt backend.

Run: .venv/bin/pytest tests/server/test_repository.py -q
"""

import json

from conceptseg.serving import repository as ft


def test_gpu_repository_agrees_with_the_exported_manifests(tiny_engines, tmp_path, plan_records):
    plans = tmp_path / "trt-fp16"
    plan_records(tiny_engines, plans, ft.ENGINE_MODELS)
    checkpoint = tmp_path / "trtllm-fp8"  # what trtllm_quantize would write (GPU machines)
    checkpoint.mkdir()
    opts = ft.RepoOptions(mllm_path=checkpoint)
    repo = ft.build_repository("gpu", tiny_engines, tmp_path / "gpu", opts, plans=plans)
    assert ft.validate_repository(repo, tiny_engines, "gpu", plans) == []
    heads = ft.parse_config(repo / "sam3_heads" / "config.pbtxt")
    manifest = json.loads((tiny_engines / "sam3_heads.json").read_text())
    assert [(t.name, list(t.dims)) for t in heads.output] == [
        (t["name"], [-1 if isinstance(d, str) else d for d in t["shape"][1:]])
        for t in manifest["outputs"]
    ]


def test_cpu_repository_agrees_with_the_exported_manifests(tiny_engines, tmp_path):
    repo = ft.build_repository("cpu", tiny_engines, tmp_path / "cpu")
    assert ft.validate_repository(repo, tiny_engines, "cpu") == []


def test_streaming_models_must_be_decoupled(tiny_engines, tmp_path):
    repo = ft.build_repository("cpu", tiny_engines, tmp_path / "cpu")
    same = (repo / "conceptseg_stream" / "1" / "model.py").read_bytes()
    assert same == (repo / "conceptseg" / "1" / "model.py").read_bytes(), "one orchestrator file"
    for name in ("conceptseg_stream", "mllm"):
        config = repo / name / "config.pbtxt"
        config.write_text(
            config.read_text().replace("model_transaction_policy { decoupled: true }", "")
        )
    problems = ft.validate_repository(repo, tiny_engines, "cpu")
    assert "conceptseg_stream: decoupled is False" in problems
    assert "mllm: must be decoupled (the orchestrators stream from it)" in problems
