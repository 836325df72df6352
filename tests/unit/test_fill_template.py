"""The repository tool: template filling, both profiles generated and validated against manifests.

Manifests are written here in the exporter's format (no export needed); the gpu plans are
``<graph>.plan.json`` records as ``conceptseg build-engines`` writes them, with empty plans.

Run: .venv/bin/pytest tests/unit/test_fill_template.py -q
"""

import json

import pytest

from conceptseg import contract
from conceptseg.serving import repository as ft


def test_fill_replaces_every_slot():
    assert ft.fill("a ${x} b ${y} ${x}", {"x": 1, "y": "two"}) == "a 1 b two 1"


@pytest.mark.parametrize(
    "template, values, says",
    [
        ("${x} ${y}", {"x": 1}, "no value for ['y']"),
        ("${x}", {"x": 1, "z": 2}, "no slot for ['z']"),
        ("${x}", {"x": "${y}"}, "contains '${'"),
    ],
)
def test_fill_refuses_unfilled_or_unknown(template, values, says):
    with pytest.raises(
        ft.TemplateError, match=r".*" + says.replace("[", r"\[").replace("$", r"\$")
    ):
        ft.fill(template, values)


def test_pbtxt_string_escapes_quotes_and_backslashes():
    assert ft.pbtxt_string('{"a": "b\\c"}') == '{\\"a\\": \\"b\\\\c\\"}'


def _tensor(name, shape, dtype="float32"):
    return {"name": name, "shape": shape, "dtype": dtype}


GRAPHS = {
    "sam3_vision": (
        [_tensor("image", ["batch", 3, 112, 112])],
        [_tensor(f"fpn{i}", ["batch", 256, 32 >> i, 32 >> i]) for i in range(3)],
    ),
    "sam3_text": (
        [
            _tensor("input_ids", ["batch", 32], "int64"),
            _tensor("attention_mask", ["batch", 32], "int64"),
        ],
        [_tensor("text_features", ["batch", 32, 256])],
    ),
    "sam3_heads": (
        [_tensor(f"fpn{i}", ["batch", 256, 32 >> i, 32 >> i]) for i in range(3)]
        + [
            _tensor("prompt", ["batch", 40, 256]),
            _tensor("prompt_mask", ["batch", 40], "int64"),
            _tensor("boxes", ["batch", "num_boxes", 4]),
            _tensor("box_labels", ["batch", "num_boxes"], "int64"),
        ],
        [
            _tensor("presence_logits", ["batch", 1]),
            _tensor("semantic_logits", ["batch", 1, 32, 32]),
            _tensor("instance_scores", ["batch", 8]),
            _tensor("instance_boxes", ["batch", 8, 4]),
            _tensor("instance_masks", ["batch", 8, 32, 32]),
        ],
    ),
    "ctm": (
        [_tensor("hidden", ["batch", "seq", 64]), _tensor("key_mask", ["batch", "seq"], "int64")],
        [_tensor("concept", ["batch", 8, 256])],
    ),
}


@pytest.fixture
def engines(tmp_path):
    d = tmp_path / "engines"
    d.mkdir()
    (tmp_path / "w" / "mllm").mkdir(parents=True)
    (d / "trtllm-fp8").mkdir()  # a quantized checkpoint for the gpu profile's MLLM
    manifest = {
        "weights": str(tmp_path / "w"),
        "mllm": str(tmp_path / "w" / "mllm"),
        "sam3": str(tmp_path / "w" / "sam3"),
        "q_max": 8,
        "hidden_size": 64,
        "ctm_buckets": [128, 256, 512, 768],
    }
    (d / "manifest.json").write_text(json.dumps(manifest))
    for name, (inputs, outputs) in GRAPHS.items():
        (d / f"{name}.json").write_text(
            json.dumps({"graph": name, "inputs": inputs, "outputs": outputs})
        )
        (d / f"{name}.onnx").write_bytes(b"")  # the cpu engine models' files (validate looks)
    return d


def test_cpu_repository_is_valid(engines, tmp_path):
    repo = ft.build_repository(
        "cpu", engines, tmp_path / "repo", ft.RepoOptions(pipeline_config={"max_new_tokens": 8})
    )
    assert ft.validate_repository(repo, engines, "cpu") == []
    heads = ft.parse_config(repo / "sam3_heads" / "config.pbtxt")
    assert heads.backend == "python" and heads.max_batch_size == 8
    assert [list(i.dims) for i in heads.input][-2:] == [[-1, 4], [-1]], "num_boxes is dynamic"
    assert heads.model_warmup[0].inputs["boxes"].dims == [1, 4], "warm-up sends one padding box"
    ctm = ft.parse_config(repo / "ctm" / "config.pbtxt")
    assert ctm.model_warmup[0].inputs["hidden"].dims == [128, 64], "smallest CTM bucket"
    orchestrator = ft.parse_config(repo / "conceptseg" / "config.pbtxt")
    params = {k: v.string_value for k, v in orchestrator.parameters.items()}
    assert json.loads(params["pipeline_config"]) == {"max_new_tokens": 8}
    assert params["engines"] == str(engines.resolve())
    for model in ("conceptseg", "mllm", "sam3_vision", "ctm"):
        assert (repo / model / "1" / "model.py").exists()


def test_orchestrator_config_is_the_contract(engines, tmp_path):
    repo = ft.build_repository("cpu", engines, tmp_path / "repo")
    cfg = ft.parse_config(repo / "conceptseg" / "config.pbtxt")
    assert [i.name for i in cfg.input] == list(contract.INPUTS)
    assert [o.name for o in cfg.output] == list(contract.OUTPUTS)
    assert [i.optional for i in cfg.input] == [s.optional for s in contract.INPUTS.values()]


def test_gpu_repository_is_valid_against_plans(engines, tmp_path, plan_records):
    plans = tmp_path / "trt-fp16"
    plan_records(engines, plans, GRAPHS)
    repo = ft.build_repository("gpu", engines, tmp_path / "repo", plans=plans)
    assert ft.validate_repository(repo, engines, "gpu", plans) == []
    ctm = ft.parse_config(repo / "ctm" / "config.pbtxt")
    assert ctm.platform == "tensorrt_plan" and ctm.default_model_filename == "model.plan"
    assert list(ctm.instance_group[0].profile) == ["4"], (
        "the throughput profile, after 4 latency ones"
    )
    assert ctm.max_batch_size == 8, "the throughput profile's max batch"
    assert (repo / "ctm" / "1" / "model.plan").resolve() == (plans / "ctm.plan").resolve()
    mllm = ft.parse_config(repo / "mllm" / "config.pbtxt")
    assert mllm.parameters["mllm_backend"].string_value == "trtllm"
    assert mllm.parameters["mllm_path"].string_value == str((engines / "trtllm-fp8").resolve())


def test_mllm_backend_and_its_directory(engines, tmp_path):
    def mllm_params(**opts):
        repo = ft.build_repository("cpu", engines, tmp_path / "r", ft.RepoOptions(**opts))
        cfg = ft.parse_config(repo / "mllm" / "config.pbtxt")
        return {k: v.string_value for k, v in cfg.parameters.items()}

    hf = mllm_params()
    assert hf["mllm_backend"] == "hf" and hf["mllm_path"] == str(tmp_path / "w" / "mllm")
    assert hf["prefix_cache"] == "4"
    with pytest.raises(ft.TemplateError, match="export it with `conceptseg export --parts mllm`"):
        mllm_params(mllm_backend="ort-genai", mllm_precision="int4")
    (engines / "mllm" / "int4").mkdir(parents=True)
    ort = mllm_params(mllm_backend="ort-genai", mllm_precision="int4")
    assert ort["mllm_path"] == str((engines / "mllm" / "int4").resolve())
    with pytest.raises(ft.TemplateError, match="choose one of"):
        mllm_params(mllm_backend="vllm")


def test_gpu_validation_catches_a_plan_that_disagrees(engines, tmp_path, plan_records):
    plans = tmp_path / "plans"
    plan_records(engines, plans, GRAPHS)
    record = json.loads((plans / "ctm.plan.json").read_text())
    record["inputs"][1]["dtype"] = "INT32"
    (plans / "ctm.plan.json").write_text(json.dumps(record))
    (plans / "sam3_text.plan").unlink()
    repo = ft.build_repository("gpu", engines, tmp_path / "repo", plans=plans)
    problems = ft.validate_repository(repo, engines, "gpu", plans)
    assert any(p.startswith("ctm: plan inputs") for p in problems), problems
    assert any("sam3_text: 1/model.plan" in p for p in problems), problems


def test_validation_catches_a_config_that_disagrees(engines, tmp_path):
    repo = ft.build_repository("cpu", engines, tmp_path / "repo")
    path = repo / "ctm" / "config.pbtxt"
    path.write_text(path.read_text().replace("TYPE_INT64", "TYPE_INT32"))
    problems = ft.validate_repository(repo, engines, "cpu")
    assert problems and problems[0].startswith("ctm: config inputs"), problems


def test_missing_manifest_or_plan_fails_loudly(engines, tmp_path):
    with pytest.raises(ft.TemplateError, match="sam3_vision.plan.json is missing"):
        ft.build_repository("gpu", engines, tmp_path / "repo", plans=tmp_path)
    (engines / "sam3_text.json").unlink()
    with pytest.raises(ft.TemplateError, match="sam3_text.json is missing"):
        ft.build_repository("cpu", engines, tmp_path / "repo2")
    with pytest.raises(ft.TemplateError, match="profile 'tpu'"):
        ft.build_repository("tpu", engines, tmp_path / "repo3")


def test_command_line(engines, tmp_path, capsys):
    assert (
        ft.main(["--profile", "cpu", "--engines", str(engines), "--out", str(tmp_path / "r")]) == 0
    )
    assert "wrote cpu repository" in capsys.readouterr().out


def test_validation_catches_a_missing_graph_file(engines, tmp_path):
    repo = ft.build_repository("cpu", engines, tmp_path / "r")
    (engines / "sam3_heads.onnx").unlink()
    problems = ft.validate_repository(repo, engines, "cpu")
    assert problems == [f"sam3_heads: {engines / 'sam3_heads.onnx'} is missing"]


def test_mllm_precision_reaches_the_mllm_model_and_is_checked(engines, tmp_path):
    repo = ft.build_repository(
        "cpu", engines, tmp_path / "r", ft.RepoOptions(mllm_precision="bf16")
    )
    mllm = ft.parse_config(repo / "mllm" / "config.pbtxt")
    assert mllm.parameters["mllm_precision"].string_value == "bf16"
    with pytest.raises(ft.TemplateError, match="mllm precision 'fp16': hf takes"):
        ft.model_values("cpu", engines, ft.RepoOptions(mllm_precision="fp16"))
