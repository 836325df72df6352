"""Exported graphs under ONNX Runtime vs the torch modules, and the whole pipeline on both.

Tolerances (fp32 on CPU): graphs within rtol 1e-4 / atol 1e-5 of torch; the pipeline's masks
with IoU >= 0.99 and the same route and answer.
Run: .venv/bin/pytest tests/models/test_export_ort.py -q
"""

import json

import numpy as np
import pytest
import torch

from conceptseg.backends import ort
from conceptseg.backends.ort import OrtGraph
from conceptseg.backends.torch_ref import TorchSam3, geometry_padding
from conceptseg.build import build_pipeline
from conceptseg.checkpoints import load_ctm
from conceptseg.config import PipelineConfig
from conceptseg.masks import iou
from conceptseg.models.engines import bucket, pad_hidden
from conceptseg.models.sam3_inputs import build_prompt, preprocess
from conceptseg.pipeline import Pipeline
from conceptseg.samples import sample_request, sample_target
from conceptseg.types import Request

TOL = {"rtol": 1e-4, "atol": 1e-5}


@pytest.fixture(scope="module")
def torch_sam3(tiny_weights):
    return TorchSam3(tiny_weights / "sam3")


@pytest.fixture(scope="module")
def ort_sam3(tiny_engines):
    return ort.ort_sam3(tiny_engines, threads=2)


def test_manifests(tiny_engines):
    manifest = json.loads((tiny_engines / "manifest.json").read_text())
    assert set(manifest["graphs"]) == {"sam3_vision", "sam3_text", "sam3_heads", "ctm", "mllm"}
    assert (
        manifest["q_max"] == 8 and manifest["hidden_size"] == 64 and manifest["synthetic_weights"]
    )
    assert (tiny_engines / "sam3_tokenizer" / "vocab.json").exists()
    for name in set(manifest["graphs"]) - {"mllm"}:  # mllm: tests/models/test_ortgenai_mllm.py
        graph = json.loads((tiny_engines / f"{name}.json").read_text())
        assert graph["opset"] == 18 and len(graph["source_sha256"]) == 64
        assert all(i["shape"][0] == "batch" for i in graph["inputs"]), name
        assert {"torch", "onnx", "onnxruntime", "transformers"} <= set(graph["versions"])
        for batch in graph["parity_vs_torch_fp32"].values():
            assert all(v["max_abs"] < 1e-4 for v in batch.values()), (name, batch)
    heads = json.loads((tiny_engines / "sam3_heads.json").read_text())
    shapes = {i["name"]: i["shape"] for i in heads["inputs"]}
    assert shapes["prompt"] == ["batch", 8 + 32, 256] and shapes["prompt_mask"] == ["batch", 40]


def test_vision_and_text_match_torch(torch_sam3, ort_sam3):
    ours = ort_sam3.encode_image(sample_target())
    ref = torch_sam3.encode_image(sample_target()).vision.fpn_hidden_states
    for level in range(3):
        torch.testing.assert_close(torch.from_numpy(ours.fpn[level]), ref[level], **TOL)
    feats, mask = ort_sam3.text_features("a red mug")
    ref_feats, ref_mask = torch_sam3.text_features("a red mug")
    torch.testing.assert_close(torch.from_numpy(feats), ref_feats[0], **TOL)
    assert np.array_equal(mask, ref_mask[0].numpy())


@pytest.mark.parametrize("with_concept", [False, True])
def test_heads_match_the_unmodified_torch_model(torch_sam3, ort_sam3, with_concept):
    concept = (
        np.random.default_rng(1).standard_normal((8, 256)).astype(np.float32)
        if with_concept
        else None
    )
    ours = ort_sam3.segment(ort_sam3.encode_image(sample_target()), "a red mug", concept)
    ref = torch_sam3.segment(torch_sam3.encode_image(sample_target()), "a red mug", concept)
    assert abs(ours.presence - ref.presence) < 1e-5
    torch.testing.assert_close(
        torch.from_numpy(ours.semantic_logits), torch.from_numpy(ref.semantic_logits), **TOL
    )
    np.testing.assert_allclose(ours.scores, ref.scores[: len(ours.scores)], rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(ours.boxes, ref.boxes[: len(ours.boxes)], rtol=1e-4, atol=1e-5)


def test_heads_with_a_real_box_prompt(torch_sam3, tiny_engines):
    """The batched ROI rewrite of the geometry encoder equals transformers' per-image version."""
    from transformers.modeling_outputs import BaseModelOutputWithPooling

    heads = OrtGraph(tiny_engines, "sam3_heads")
    image = torch_sam3.encode_image(sample_target())
    feats, mask = torch_sam3.text_features("mug")
    prompt, prompt_mask = build_prompt(feats[0].numpy(), mask[0].numpy(), None, 8)
    boxes = np.array([[[0.3, 0.5, 0.2, 0.3], [0.7, 0.6, 0.1, 0.2]]] * 2, np.float32)  # cxcywh
    labels = np.array([[1, 0], [1, -10]], np.int64)
    fpn = [f.repeat(2, 1, 1, 1).numpy() for f in image.vision.fpn_hidden_states[:3]]
    out = heads.run(fpn0=fpn[0], fpn1=fpn[1], fpn2=fpn[2], prompt=np.stack([prompt] * 2),
                    prompt_mask=np.stack([prompt_mask] * 2), boxes=boxes, box_labels=labels)  # fmt: skip
    for row in range(2):
        with torch.inference_mode():
            ref = torch_sam3.model(
                vision_embeds=image.vision,
                text_embeds=BaseModelOutputWithPooling(
                    pooler_output=torch.from_numpy(prompt[None])
                ),
                attention_mask=torch.from_numpy(prompt_mask[None]),
                input_boxes=torch.from_numpy(boxes[row : row + 1]),
                input_boxes_labels=torch.from_numpy(labels[row : row + 1]),
            )
        torch.testing.assert_close(
            torch.from_numpy(out["semantic_logits"][row]), ref.semantic_seg[0], **TOL
        )
        torch.testing.assert_close(
            torch.from_numpy(out["presence_logits"][row]), ref.presence_logits[0], **TOL
        )


def test_ctm_batched_with_padding_equals_single_and_torch(tiny_weights, tiny_engines):
    ctm_ort, ctm_torch = ort.ort_ctm(tiny_engines), load_ctm(tiny_weights / "mllm")
    rng = np.random.default_rng(0)
    hiddens = [rng.standard_normal((n, 64)).astype(np.float32) for n in (3, 130, 40)]
    batched = ctm_ort.batch(hiddens)
    assert batched.shape == (3, 8, 256)
    for i, h in enumerate(hiddens):
        np.testing.assert_allclose(batched[i], ctm_ort(h), rtol=1e-4, atol=1e-5)
        with torch.inference_mode():
            ref = ctm_torch(torch.from_numpy(h)[None])[0].numpy()
        np.testing.assert_allclose(batched[i], ref, rtol=1e-4, atol=1e-5)


def test_buckets():
    assert [bucket(n, (128, 256, 512, 768)) for n in (1, 128, 129, 768, 769, 2000)] == [
        128,
        128,
        256,
        768,
        1536,
        2304,
    ]
    batch, mask = pad_hidden([np.ones((2, 4), np.float32), np.ones((5, 4), np.float32)], (4, 8))
    assert batch.shape == (2, 8, 4) and mask.sum(1).tolist() == [2, 5] and batch[0, 2:].sum() == 0


def test_preprocess_is_shared(ort_sam3, torch_sam3):
    assert ort_sam3.side == torch_sam3.side == 112
    assert preprocess(sample_target(), 112).shape == (1, 3, 112, 112)
    boxes, labels = geometry_padding(2)
    assert boxes.shape == (2, 1, 4) and labels.tolist() == [[-10], [-10]]


@pytest.fixture(scope="module")
def pipelines(tiny_weights, tiny_engines):
    config = PipelineConfig(max_new_tokens=12)
    ours = build_pipeline(tiny_weights, backend="onnxruntime", engines=tiny_engines, config=config)
    return ours, build_pipeline(tiny_weights, backend="torch", config=config)


@pytest.mark.parametrize(
    "question, router",
    [("mug", True), ("the mug with a handle on the table", True), ("mug", False)],
)
def test_pipeline_onnxruntime_matches_torch(pipelines, question, router):
    config = PipelineConfig(max_new_tokens=12, router=router)
    ours, ref = (Pipeline(p.seg, p.mllm, p.ctm, config) for p in pipelines)
    sample = sample_request()
    request = Request(sample.image, question, sample.references)
    a, b = ours.run(request), ref.run(request)
    assert a.route == b.route and a.answer == b.answer and a.text == b.text
    assert (a.presence is None) == (b.presence is None)
    if a.presence is not None:
        assert abs(a.presence - b.presence) < 1e-5
    assert iou(a.mask, b.mask) >= 0.99


def test_exported_graphs_use_only_tensorrt_supported_ops(tiny_engines):
    """Static check against the pinned TensorRT ONNX parser's operator list (export/trt_supported_ops.json)."""
    from conceptseg_export.op_check import check_dir

    results, _ = check_dir(tiny_engines)
    assert set(results) >= {"sam3_vision.onnx", "sam3_text.onnx", "sam3_heads.onnx", "ctm.onnx"}
    assert {graph: bad for graph, bad in results.items() if bad} == {}


def test_vision_graph_has_no_shape_branches(tiny_engines):
    """The tracer's If nodes on the fixed image size are folded away (TensorRT tooling chokes on them)."""
    import onnx

    model = onnx.load(str(tiny_engines / "sam3_vision.onnx"), load_external_data=False)
    assert not [n for n in model.graph.node if n.op_type == "If"]


def test_pipeline_without_torch_models_matches_torch(tiny_weights, tiny_engines, pipelines):
    """SAM 3 and the CTM under ONNX Runtime, the MLLM under ort-genai (fp32) vs the torch reference."""
    config = PipelineConfig(max_new_tokens=12, router=False)
    ours = build_pipeline(tiny_weights, backend="onnxruntime", mllm_backend="ort-genai", engines=tiny_engines,
                          config=config)  # fmt: skip
    ref = Pipeline(pipelines[1].seg, pipelines[1].mllm, pipelines[1].ctm, config)
    a, b = ours.run(sample_request()), ref.run(sample_request())
    assert a.route == b.route == "reason"
    assert a.text == b.text and a.answer == b.answer and a.tokens == b.tokens == 12
    assert iou(a.mask, b.mask) >= 0.99
