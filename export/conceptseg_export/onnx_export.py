"""``conceptseg export``: SAM 3 (vision, text, heads) and the CTM to ONNX, with manifests.

Each graph: an export-only wrapper (``graphs.py``), an eager run on dummy inputs whose keys are
the ONNX input names, ``torch.onnx.export`` (TorchScript exporter, opset 18, named dynamic axes),
then an ONNX Runtime run on the same inputs and on another batch size. The measured differences
go into ``<graph>.json`` beside the graph, with its inputs/outputs, opset, source checkpoint hash
and package versions. ``manifest.json`` ties the directory together (source checkpoint paths,
prompt layout, CTM sequence buckets) so that the runtime needs nothing else.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import onnxscript.optimizer
import torch
from onnxruntime.quantization import QuantType, quantize_dynamic
from transformers import Sam3Model

from conceptseg.backends.torch_ref import clip_tokenizer
from conceptseg.checkpoints import load_ctm, read_tensors
from conceptseg.models.ctm import CTM_PREFIXES, ConceptTranslationModule
from conceptseg.models.engines import CTM_BUCKETS, vision_graph
from conceptseg.models.qwen import quiet_transformers
from conceptseg.models.sam3_inputs import PAD_BOX_LABEL, TEXT_CONTEXT
from conceptseg.types import UsageError
from conceptseg.weights import check_weights, is_synthetic, safetensors_files
from conceptseg_export.export_config import (
    EXTERNAL_DATA_BYTES,
    GRAPHS,
    INT8_VISION,
    ExportConfig,
)
from conceptseg_export.graphs import (
    SAM3_PARTS,
    CtmGraph,
    HeadsGraph,
    TextGraph,
    VisionGraph,
)
from conceptseg_export.manifest import export_versions, sha256_files
from conceptseg_export.mllm_export import export_mllm


def _sha256_tensors(tensors: dict[str, torch.Tensor]) -> str:
    digest = hashlib.sha256()
    for key in sorted(tensors):
        digest.update(key.encode())
        digest.update(tensors[key].contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _describe(
    arrays: dict[str, np.ndarray], dynamic: dict[str, dict[int, str]]
) -> list[dict[str, Any]]:
    out = []
    for name, array in arrays.items():
        shape: list[int | str] = list(array.shape)
        for axis, label in dynamic.get(name, {}).items():
            shape[axis] = label
        out.append({"name": name, "shape": shape, "dtype": str(array.dtype)})
    return out


def _diff(
    ours: list[np.ndarray], ref: list[np.ndarray], names: tuple[str, ...]
) -> dict[str, dict[str, float]]:
    report = {}
    for name, a, b in zip(names, ours, ref, strict=True):
        delta = np.abs(a.astype(np.float64) - b.astype(np.float64))
        report[name] = {
            "max_abs": float(delta.max(initial=0.0)),
            "max_rel": float((delta / (np.abs(b) + 1e-6)).max(initial=0.0)),
        }
    return report


@dataclass
class GraphSpec:
    name: str
    module: torch.nn.Module
    inputs: Callable[[int], dict[str, torch.Tensor]]  # batch size -> dummy inputs
    dynamic: dict[str, dict[int, str]]
    source_hash: str
    trace_batch: int = 2  # the batch traced; the other of (1, 2) is checked too
    exporter: str = "torchscript"  # or "dynamo" (torch.export: fake tensors, cleaner graph)
    prepare: Callable[[], None] | None = None  # called just before this graph is exported


def _run_eager(module: torch.nn.Module, feeds: dict[str, torch.Tensor]) -> list[np.ndarray]:
    with torch.no_grad():
        out = module(**feeds)
    out = out if isinstance(out, tuple) else (out,)
    return [t.detach().float().numpy() if t.is_floating_point() else t.numpy() for t in out]


def _export(spec: GraphSpec, path: Path, input_names: tuple[str, ...], output_names: tuple[str, ...],
            feeds: dict[str, torch.Tensor], opset: int) -> None:  # fmt: skip
    if spec.exporter == "dynamo":
        # torch.export traces with fake tensors: no activations are held, whatever the input size.
        dims: dict[str, torch.export.Dim] = {}
        shapes = {
            name: {
                axis: dims.setdefault(label, torch.export.Dim(label, min=1, max=64))
                for axis, label in spec.dynamic.get(name, {}).items()
            }  # fmt: skip
            for name in input_names
        }
        torch.onnx.export(spec.module, tuple(feeds.values()), str(path), input_names=list(input_names),
                          output_names=list(output_names), dynamic_shapes=shapes, opset_version=opset,
                          dynamo=True, external_data=True, verbose=False)  # fmt: skip
        return
    torch.onnx.export(
        spec.module,
        tuple(feeds.values()),
        str(path),
        input_names=list(input_names),
        output_names=list(output_names),
        dynamic_axes=spec.dynamic,
        opset_version=opset,
        dynamo=False,
    )


def _fold(path: Path, external: bool) -> None:
    """Fold ``If`` nodes the tracer left on shapes that are fixed with onnxscript's optimizer
    (TensorRT's ONNX tooling handles them poorly), keeping big weights in one external file.
    Graphs without ``If`` are left as exported (the optimizer's rewrite of the heads graph does
    not load). The ORT parity check follows."""

    model = onnx.load(str(path))
    if not any(node.op_type == "If" for node in model.graph.node):
        return
    model = onnxscript.optimizer.optimize(model)
    for stale in path.parent.glob(f"{path.name}*"):
        stale.unlink(missing_ok=True)
    if external:
        onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=f"{path.name}.data")  # fmt: skip
    else:
        onnx.save_model(model, str(path))


def export_graph(spec: GraphSpec, out_dir: Path, opset: int) -> dict[str, Any]:
    """Export one graph, check it under ONNX Runtime at batch 1 and 2, write its manifest."""

    input_names, output_names = GRAPHS[spec.name]
    path = out_dir / f"{spec.name}.onnx"
    feeds = spec.inputs(spec.trace_batch)
    assert tuple(feeds) == input_names, (
        f"dummy input keys {tuple(feeds)} != ONNX names {input_names}"
    )
    if spec.prepare is not None:
        spec.prepare()
    for stale in [*out_dir.glob(f"{spec.name}.onnx*"), out_dir / f"{spec.name}.sample.npz"]:
        stale.unlink(missing_ok=True)
    reference = _run_eager(spec.module, feeds)  # one eager run before export
    start = time.perf_counter()
    with warnings.catch_warnings():
        # The tracer's notes on shape checks and Python bools; parity below is what counts.
        warnings.simplefilter("ignore")
        _export(spec, path, input_names, output_names, feeds, opset)
    export_s = time.perf_counter() - start
    weights_bytes = sum(p.numel() * p.element_size() for p in spec.module.parameters())
    external = weights_bytes > EXTERNAL_DATA_BYTES
    _fold(path, external)
    data_file = out_dir / f"{spec.name}.onnx.data"
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    parity = {}
    for batch in sorted({spec.trace_batch, 3 - spec.trace_batch}):
        batch_feeds = feeds if batch == spec.trace_batch else spec.inputs(batch)
        ref = reference if batch == spec.trace_batch else _run_eager(spec.module, batch_feeds)
        ours = session.run(list(output_names), {k: v.numpy() for k, v in batch_feeds.items()})
        parity[f"batch{batch}"] = _diff(ours, ref, output_names)
    manifest = {
        "graph": spec.name,
        "file": path.name,
        "external_data": data_file.name if data_file.exists() else None,
        "opset": opset,
        "inputs": _describe({k: v.numpy() for k, v in feeds.items()}, spec.dynamic),
        "outputs": _describe(dict(zip(output_names, reference, strict=True)), spec.dynamic),
        "source_sha256": spec.source_hash,
        "parity_vs_torch_fp32": parity,
        "export_seconds": round(export_s, 2),
        "versions": export_versions(),
    }
    # the inputs of the eager run: AutoCast's calibration and the plans' verification inputs
    np.savez(out_dir / f"{spec.name}.sample.npz", **{k: v.numpy() for k, v in feeds.items()})
    (out_dir / f"{spec.name}.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def _sam3_specs(sam3_dir: Path, cfg: ExportConfig, q_max: int) -> list[GraphSpec]:


    quiet_transformers()
    model = Sam3Model.from_pretrained(sam3_dir).eval()  # sdpa until the heads (see below)
    side = model.config.vision_config.backbone_config.image_size
    top_k = min(cfg.top_k, model.config.detr_decoder_config.num_queries)
    source = sha256_files(safetensors_files(sam3_dir))
    tokenize = clip_tokenizer(sam3_dir)
    generator = torch.Generator().manual_seed(0)
    vision = VisionGraph(model).eval()
    with torch.no_grad():  # FPN levels for the heads' dummy inputs: one image, repeated
        levels = [
            f.repeat(2, 1, 1, 1) for f in vision(torch.randn(1, 3, side, side, generator=generator))
        ]
    width = levels[0].shape[1]

    def image_inputs(b: int) -> dict[str, torch.Tensor]:
        return {"image": torch.randn(b, 3, side, side, generator=torch.Generator().manual_seed(b))}

    def text_inputs(b: int) -> dict[str, torch.Tensor]:
        pairs = [tokenize(t) for t in ("a red car", "the mug with a handle on the left")[:b]]
        return {
            "input_ids": torch.from_numpy(np.concatenate([p[0] for p in pairs])),
            "attention_mask": torch.from_numpy(np.concatenate([p[1] for p in pairs])),
        }

    def heads_inputs(b: int) -> dict[str, torch.Tensor]:
        length = q_max + TEXT_CONTEXT
        mask = torch.ones(b, length, dtype=torch.long)
        mask[:, q_max + 6 :] = 0  # six text tokens
        mask[-1, : q_max // 2] = 0  # the last row uses only half of the concept slots
        return {
            "fpn0": levels[0][:b],
            "fpn1": levels[1][:b],
            "fpn2": levels[2][:b],
            "prompt": torch.randn(b, length, width, generator=torch.Generator().manual_seed(b)),
            "prompt_mask": mask,
            "boxes": torch.zeros(b, 1, 4),
            "box_labels": torch.full((b, 1), PAD_BOX_LABEL, dtype=torch.long),
        }

    batch = {0: "batch"}
    heads_dynamic = {n: batch for n in GRAPHS["sam3_heads"][0] + GRAPHS["sam3_heads"][1]}
    heads_dynamic |= {n: {0: "batch", 1: "num_boxes"} for n in ("boxes", "box_labels")}
    return [
        GraphSpec(
            "sam3_vision",
            vision,
            image_inputs,
            {n: batch for n in ("image", "fpn0", "fpn1", "fpn2")},
            source,
            exporter="dynamo",  # the TorchScript tracer holds 1008 px activations: OOM at 24 GiB
        ),
        GraphSpec(
            "sam3_text",
            TextGraph(model).eval(),
            text_inputs,
            {n: batch for n in GRAPHS["sam3_text"][0] + GRAPHS["sam3_text"][1]},
            source,
        ),
        GraphSpec(
            "sam3_heads",
            HeadsGraph(model, top_k).eval(),
            heads_inputs,
            heads_dynamic,
            source,
            # the heads export only with eager attention (sdpa's mask handling breaks the graph)
            prepare=lambda: model.set_attn_implementation("eager"),
        ),
    ]


def _ctm_spec(mllm_dir: Path) -> GraphSpec:

    state = {k: v.float() for k, v in read_tensors(mllm_dir, CTM_PREFIXES).items()}
    ctm = ConceptTranslationModule.from_state_dict(state)
    hidden_size = state["learnable_query.param.weight"].shape[1]

    def inputs(b: int) -> dict[str, torch.Tensor]:
        mask = torch.ones(b, 40, dtype=torch.long)
        mask[-1, 25:] = 0 if b > 1 else 1
        return {
            "hidden": torch.randn(b, 40, hidden_size, generator=torch.Generator().manual_seed(b)),
            "key_mask": mask,
        }

    dynamic = {
        "hidden": {0: "batch", 1: "seq"},
        "key_mask": {0: "batch", 1: "seq"},
        "concept": {0: "batch"},
    }
    return GraphSpec("ctm", CtmGraph(ctm).eval(), inputs, dynamic, _sha256_tensors(state))


def quantize_vision_int8(out: Path, seed: int = 0) -> dict[str, Any]:
    """``sam3_vision.int8.onnx`` from ``sam3_vision.onnx`` in ``out``: dynamic int8 quantization of
    the MatMul weights (per tensor, activations quantized at run time), for ONNX Runtime's CPU
    int8 kernels. Its manifest keeps the fp32 graph's inputs and outputs (the contract is the
    same) and records the difference to the fp32 graph on a seeded random image."""


    stem = vision_graph("int8")  # the file name the ONNX Runtime backend and Triton load
    src, dst = out / "sam3_vision.onnx", out / f"{stem}.onnx"
    if not src.exists() or not (out / "sam3_vision.json").exists():

        raise UsageError(
            "--parts",
            f"{INT8_VISION} quantizes {src}: export sam3_vision into the same --out first",
        )
    for stale in out.glob(f"{stem}.onnx*"):
        stale.unlink(missing_ok=True)
    start = time.perf_counter()
    quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8, op_types_to_quantize=["MatMul"],
                     use_external_data_format=True)  # fmt: skip
    seconds = time.perf_counter() - start
    fp32 = json.loads((out / "sam3_vision.json").read_text())
    side = int(fp32["inputs"][0]["shape"][-1])
    image = np.random.default_rng(seed).standard_normal((1, 3, side, side)).astype(np.float32)
    outputs = {}
    for path in (src, dst):
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        outputs[path] = session.run([t["name"] for t in fp32["outputs"]], {"image": image})
        del session
    parity = {}
    for spec, ref, ours in zip(fp32["outputs"], outputs[src], outputs[dst], strict=True):
        delta = ours.astype(np.float64) - ref
        parity[spec["name"]] = {
            "max_abs": float(np.abs(delta).max()),
            "relative_l2": float(np.linalg.norm(delta) / max(np.linalg.norm(ref), 1e-30)),
        }
    record = {
        "graph": stem,
        "file": dst.name,
        "external_data": f"{dst.name}.data" if (out / f"{dst.name}.data").exists() else None,
        "opset": fp32["opset"],
        "inputs": fp32["inputs"],
        "outputs": fp32["outputs"],
        "source_sha256": fp32["source_sha256"],
        "quantization": {
            "method": "onnxruntime.quantization.quantize_dynamic",
            "weights": "int8",
            "op_types": ["MatMul"],
            "per_channel": False,
            "runs_on": "ONNX Runtime (CPU); not a TensorRT input",
        },  # fmt: skip
        "parity_vs_fp32_graph": parity,
        "export_seconds": round(seconds, 2),
        "versions": export_versions(),
    }
    (out / f"{stem}.json").write_text(json.dumps(record, indent=2) + "\n")
    return record


def main(cfg: ExportConfig) -> Path:
    """Export the requested graphs of ``cfg.weights`` into ``cfg.out``; returns ``cfg.out``."""

    parts = cfg.part_list()
    precisions = cfg.mllm_precision_list() if "mllm" in parts else ()
    mllm_dir, sam3_dir = check_weights(cfg.weights)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    ctm_module = load_ctm(mllm_dir)
    q_max = cfg.q_max or ctm_module.num_queries
    specs: list[GraphSpec] = []
    if set(parts) & set(SAM3_PARTS):
        specs += [s for s in _sam3_specs(sam3_dir, cfg, q_max) if s.name in parts]
    if "ctm" in parts:
        specs.append(_ctm_spec(mllm_dir))
    manifest_path = out / "manifest.json"
    manifest = json.loads(manifest_path.read_text()) if manifest_path.exists() else {"graphs": {}}
    if "sam3_vision" in parts and INT8_VISION not in parts:
        # quantized from the graph about to be replaced: drop it rather than leave it stale
        stale = sorted(out.glob(f"{vision_graph('int8')}.*"))
        for path in stale:
            path.unlink()
        listed = manifest["graphs"].pop(vision_graph("int8"), None)
        if stale or listed:
            print(
                f"removed the int8 image encoder (re-make it with --parts sam3_vision,{INT8_VISION})"
            )
    for i, spec in enumerate(specs, 1):
        print(f"[{i}/{len(specs)}] {spec.name}: exporting ...", flush=True)
        graph = export_graph(spec, out, cfg.opset)
        worst = max(
            v["max_abs"] for b in graph["parity_vs_torch_fp32"].values() for v in b.values()
        )
        print(
            f"[{i}/{len(specs)}] {spec.name}: {graph['export_seconds']} s, max |onnxruntime - torch| = {worst:.2e}"
        )
        manifest["graphs"][spec.name] = f"{spec.name}.json"
    if INT8_VISION in parts:
        print(
            f"[{INT8_VISION}] quantizing sam3_vision.onnx (dynamic int8 MatMul weights) ...",
            flush=True,
        )
        record = quantize_vision_int8(out)
        worst = max(v["relative_l2"] for v in record["parity_vs_fp32_graph"].values())
        print(
            f"[{INT8_VISION}] {record['export_seconds']} s, relative L2 vs the fp32 graph <= {worst:.2e}"
        )
        manifest["graphs"][record["graph"]] = f"{record['graph']}.json"
    if "mllm" in parts:

        print(
            "[mllm] exporting the Qwen2.5-VL vision/embedding graphs and the ort-genai decoder ...",
            flush=True,
        )
        manifest["graphs"].update(
            export_mllm(mllm_dir, out, precisions, verify_tokens=cfg.mllm_verify_tokens)
        )
    # the runtime's tokenizer (tokenizers, no transformers) + the checkpoint's own CLIP files
    tokenizer_dir = out / "sam3_tokenizer"
    clip_tokenizer(sam3_dir).save(tokenizer_dir)
    for name in ("vocab.json", "merges.txt", "tokenizer_config.json"):
        shutil.copy2(sam3_dir / name, tokenizer_dir / name)
    manifest.update(
        {
            "weights": str(Path(cfg.weights).resolve()),
            "mllm": str(mllm_dir.resolve()),
            "sam3": str(sam3_dir.resolve()),
            "synthetic_weights": is_synthetic(Path(cfg.weights)),
            "text_context": TEXT_CONTEXT,
            "q_max": q_max,
            "num_queries": ctm_module.num_queries,
            "hidden_size": ctm_module.learnable_query.param.weight.shape[1],
            "ctm_buckets": list(CTM_BUCKETS),
            "prompt_layout": f"[concept slots ({q_max}); text ({TEXT_CONTEXT})], mask 0 = unused slot",
            "created": datetime.now(UTC).isoformat(timespec="seconds"),
            "versions": export_versions(),
        }
    )
    manifest_path.write_text(json.dumps(manifest, indent=2) + "\n")
    print(f"wrote {out} ({', '.join(manifest['graphs'])})")
    return out
