"""``--backend openvino`` on the tiny engines: every exported graph under OpenVINO against ONNX
Runtime on the export's own sample inputs (fp32 within 1e-5 relative L2; bf16 within 2 %, the
rounding of 8-bit mantissas through a few layers), the pipeline with it against ONNX Runtime
(same answer; mask IoU 1.0 fp32, >= 0.95 bf16), the served cpu repository's ``--sam3-precision
bf16`` pointing the image encoder at OpenVINO (and ``engine_runtime`` every engine model), and
misuse refused.

Run: .venv/bin/pytest tests/models/test_openvino.py -q
"""

from __future__ import annotations

import numpy as np
import pytest

from conceptseg.backends.openvino import OvGraph, compile_config
from conceptseg.backends.ort import OrtGraph
from conceptseg.build import build_pipeline
from conceptseg.config import from_name
from conceptseg.masks import iou
from conceptseg.samples import sample_request
from conceptseg.types import RequestError

CONFIG = from_name("test", max_new_tokens=6, router=False)
GRAPHS = ("sam3_vision", "sam3_text", "sam3_heads", "ctm")
TOLERANCE = {"fp32": 1e-5, "bf16": 0.02}


def relative_l2(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(np.float64), b.astype(np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-12))


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("graph", GRAPHS)
def test_each_graph_matches_onnxruntime(tiny_engines, graph, precision):
    feeds = dict(np.load(tiny_engines / f"{graph}.sample.npz"))
    want = OrtGraph(tiny_engines, graph, 2).run(**feeds)
    got = OvGraph(tiny_engines, graph, 2, precision).run(**feeds)
    assert list(got) == list(want), "the ONNX output names, in order"
    for name, value in want.items():
        assert got[name].shape == value.shape and got[name].dtype == value.dtype, name
        error = relative_l2(got[name], value)
        assert error <= TOLERANCE[precision], f"{graph}.{name}: {error:.2e} ({precision})"
        if precision == "bf16" and graph == "sam3_vision":
            assert error > 1e-5, "bf16 was asked for and fp32 ran"


def test_results_outlive_the_next_call_and_dtypes_are_checked(tiny_engines):
    graph = OvGraph(tiny_engines, "ctm", 1)
    feeds = dict(np.load(tiny_engines / "ctm.sample.npz"))
    first = graph.run(**feeds)["concept"].copy()
    kept = graph.run(**feeds)["concept"]
    graph.run(**{k: np.zeros_like(v) for k, v in feeds.items()})
    assert np.array_equal(kept, first), "an output is a copy, not the request's buffer"
    with pytest.raises(TypeError, match=r"ctm\.hidden: float64, the graph takes float32"):
        graph.run(**(feeds | {"hidden": feeds["hidden"].astype(np.float64)}))


def test_pipeline_on_openvino_matches_onnxruntime(tiny_weights, tiny_engines):
    request = sample_request()
    runs = {}
    for backend, precision in (("onnxruntime", "fp32"), ("openvino", "fp32"), ("openvino", "bf16")):
        pipeline = build_pipeline(tiny_weights, backend=backend, engines=tiny_engines,
                                  config=CONFIG, sam3_precision=precision)  # fmt: skip
        runs[backend, precision] = pipeline.run(request)
        assert pipeline.versions["backend"] == backend
    ort = runs["onnxruntime", "fp32"]
    for key, run in runs.items():
        assert run.route == ort.route == "reason" and run.text == ort.text, key
    # fp32 on both: pixel-identical on the Intel AMX host; a handful of boundary pixels differ on
    # the AMD host (other kernels, summation order)
    assert iou(runs["openvino", "fp32"].mask, ort.mask) >= 0.9999
    overlap = iou(runs["openvino", "bf16"].mask, ort.mask)
    print(f"\nOpenVINO bf16 image encoder vs ONNX Runtime fp32: mask IoU {overlap:.4f}")
    assert overlap >= 0.95


def test_misuse_is_refused(tiny_weights, tiny_engines, tmp_path):
    with pytest.raises(RequestError, match=r"'int8' is not one of \('fp32', 'bf16'\) for --backend openvino"):
        build_pipeline(tiny_weights, backend="openvino", engines=tiny_engines, sam3_precision="int8")
    with pytest.raises(RequestError, match="--backend openvino / --mllm-backend hf needs the exported graphs"):
        build_pipeline(tiny_weights, backend="openvino")
    with pytest.raises(RequestError, match="--parts sam3_vision"):
        OvGraph(tmp_path, "sam3_vision")
    with pytest.raises(RequestError, match="'fp16' is not one of"):
        compile_config(2, "fp16")
    assert compile_config(None, "fp32")["INFERENCE_PRECISION_HINT"] == "f32", (
        "fp32 is asked for explicitly: OpenVINO picks bf16 by itself on AMX CPUs"
    )


@pytest.mark.parametrize("runtime", ["openvino", "onnxruntime"])
def test_served_repository_picks_each_engine_models_runtime(tiny_engines, tmp_path, runtime):
    from conceptseg.serving import repository as ft

    def served(**options):
        opts = ft.RepoOptions(engine_runtime=runtime, **options)
        repo = ft.build_repository("cpu", tiny_engines, tmp_path / "cpu", opts)
        assert ft.validate_repository(repo, tiny_engines, "cpu") == []
        return {
            graph: {k: v.string_value for k, v in ft.parse_config(repo / graph / "config.pbtxt").parameters.items()}
            for graph in GRAPHS
        }  # fmt: skip

    for graph, params in served().items():
        assert (params["graph"], params["runtime"], params["precision"]) == (graph, runtime, "fp32")
    bf16 = served(sam3_precision="bf16")
    assert (bf16["sam3_vision"]["runtime"], bf16["sam3_vision"]["precision"]) == ("openvino", "bf16")
    for graph in GRAPHS[1:]:
        assert (bf16[graph]["runtime"], bf16[graph]["precision"]) == (runtime, "fp32")
    with pytest.raises(ft.TemplateError, match="choose one of"):
        ft.model_values("cpu", tiny_engines, ft.RepoOptions(sam3_precision="fp16"))
    with pytest.raises(ft.TemplateError, match=r"engine runtime 'tensorrt': choose one of"):
        ft.model_values("cpu", tiny_engines, ft.RepoOptions(engine_runtime="tensorrt"))
