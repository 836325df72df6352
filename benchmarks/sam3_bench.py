"""``conceptseg bench sam3``: SAM 3's vision encoder, heads (40-slot prompt) and text encoder at
the checkpoint's resolution, side by side:

- ``torch_eager_fp32``: transformers' ``Sam3Model`` in fp32, the reference every row is judged by;
- ``torch_bf16``: the same module under ``torch.autocast("cpu", dtype=torch.bfloat16)`` (vision
  only; what ``--backend torch --sam3-precision bf16`` runs; AMX / AVX512-BF16 kernels where the
  CPU has them), features cast back to fp32;
- ``ort_fp32``: the exported graphs under ONNX Runtime; ``ort_int8`` with ``--int8``
  (``sam3_vision.int8.onnx``, from ``conceptseg export --parts sam3_vision_int8``);
- ``ov_fp32``, ``ov_bf16``: the same graphs compiled by OpenVINO's CPU plugin (what
  ``--backend openvino`` runs; bf16 for the image encoder only, the step it is chosen for),
  skipped with ``--no-openvino``.

Quality in the same row: features' relative L2 and max abs difference vs fp32 torch, and the
mask IoU when each contender's features go through the same heads graph and prompt.
"""

from __future__ import annotations

import argparse
import gc
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from conceptseg.benchmark import RUNNERS, max_abs, relative_l2, side_by_side, summary
from conceptseg.benchmark import row as table_row


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--int8", action="store_true", help="also time sam3_vision.int8.onnx")
    parser.add_argument("--no-bf16", action="store_true", help="skip the torch bf16 contender")
    parser.add_argument("--no-openvino", action="store_true", help="skip the OpenVINO contenders")
    parser.add_argument(
        "--steps", default="vision,heads,text", help="comma list of vision,heads,text"
    )


def run(args: argparse.Namespace) -> dict[str, Any]:
    return bench_sam3(args)


def rows(results: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    for key, r in results.items():
        step, contender = key.split("/", 1)
        quality = {"rel_l2": r.get("relative_l2_vs_torch"), "max_abs": r.get("max_abs_vs_torch"),
                   "mask_iou": r.get("mask_iou_vs_torch")}  # fmt: skip
        out.append(table_row(step, contender, r, **{k: v for k, v in quality.items() if v is not None}))
    return out


def bench_sam3(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from conceptseg.backends.torch_ref import TorchSam3
    from conceptseg.models.sam3_inputs import preprocess
    from conceptseg.samples import sample_target

    torch.set_num_threads(args.threads)
    runner = RUNNERS[args.runner]
    ref = TorchSam3(Path(args.weights) / "sam3")
    engines = Path(args.engines)
    pixels = torch.from_numpy(preprocess(sample_target(), ref.side))
    rows: dict[str, Any] = {}
    steps = set(args.steps.split(","))

    def report(prefix: str) -> None:
        for key, row in rows.items():
            if key.startswith(prefix):
                print(f"{key}: {json.dumps(row)}", flush=True)

    if "vision" in steps:
        rows |= _bench_vision(args, ref, engines, pixels, runner)
        report("vision/")
        gc.collect()  # the vision sessions' arenas go before the heads are measured
    if "heads" in steps:
        rows |= _bench_heads(args, ref, engines, runner)
        report("heads/")
        gc.collect()
    if "text" in steps:
        rows |= _bench_text(args, ref, engines, runner)
        report("text/")
    return rows


def _bench_vision(
    args: argparse.Namespace, ref: Any, engines: Path, pixels: Any, runner: Callable
) -> dict:
    import torch

    from conceptseg.backends.ort import OrtGraph

    rows: dict[str, Any] = {}
    vision: dict[str, Any] = {"ort_fp32": OrtGraph(engines, "sam3_vision", args.threads)}
    if args.int8:
        vision["ort_int8"] = OrtGraph(engines, "sam3_vision.int8", args.threads)
    vision |= _ov_graphs(args, engines, "sam3_vision", ("fp32", "bf16"))

    def torch_vision() -> list[np.ndarray]:
        with torch.inference_mode():
            return [
                f.numpy()
                for f in ref.model.get_vision_features(pixel_values=pixels).fpn_hidden_states[:3]
            ]

    def torch_bf16_vision() -> list[np.ndarray]:
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
            fpn = ref.model.get_vision_features(pixel_values=pixels).fpn_hidden_states[:3]
        return [f.float().numpy() for f in fpn]

    contenders: dict[str, Callable[[], Any]] = {"torch_eager_fp32": torch_vision}
    if not args.no_bf16:
        contenders["torch_bf16"] = torch_bf16_vision
    for name, graph in vision.items():
        contenders[name] = lambda g=graph: list(g.run(image=pixels.numpy()).values())
    result = side_by_side(contenders, args.repeats, args.warmup, runner)
    del vision
    base = result["outputs"]["torch_eager_fp32"]
    masks = _masks_from_fpn(args, ref, engines, result["outputs"])
    for name, times in result["times"].items():
        out = result["outputs"][name]
        rows[f"vision/{name}"] = summary(times) | {
            "max_abs_vs_torch": max_abs(out, base),
            "relative_l2_vs_torch": relative_l2(out, base),
            "mask_iou_vs_torch": masks[name],
        }
    return rows


def _ov_graphs(
    args: argparse.Namespace, engines: Path, name: str, precisions: tuple[str, ...]
) -> dict[str, Any]:
    """``ov_<precision>``: graph ``name`` compiled by OpenVINO per precision (none with
    ``--no-openvino``)."""
    if args.no_openvino:
        return {}
    from conceptseg.backends.openvino import OvGraph

    return {f"ov_{p}": OvGraph(engines, name, args.threads, p) for p in precisions}


def _heads_feeds(ref: Any) -> dict[str, np.ndarray]:
    """The heads graph's prompt inputs for a 40-slot prompt (8 concept + 32 text slots)."""
    from conceptseg.models.sam3_inputs import build_prompt

    feats, mask = ref.text_features("the mug with a handle")
    concept = np.random.default_rng(0).standard_normal((8, 256)).astype(np.float32) * 0.1
    prompt, prompt_mask = build_prompt(feats[0].numpy(), mask[0].numpy(), concept, 8)
    return {"prompt": prompt[None], "prompt_mask": prompt_mask[None],
            "boxes": np.zeros((1, 1, 4), np.float32), "box_labels": np.full((1, 1), -10, np.int64)}  # fmt: skip


def _masks_from_fpn(
    args: argparse.Namespace, ref: Any, engines: Path, fpns: dict[str, list[np.ndarray]]
) -> dict[str, float]:
    """Mask IoU vs torch when each contender's features go through the same heads graph: what a
    difference in the features does to the answer."""
    from conceptseg.backends.ort import OrtGraph
    from conceptseg.masks import iou

    heads, feeds = OrtGraph(engines, "sam3_heads", args.threads), _heads_feeds(ref)
    logits = {name: heads.run(fpn0=f[0], fpn1=f[1], fpn2=f[2], **feeds)["semantic_logits"][0, 0]
              for name, f in fpns.items()}  # fmt: skip
    base = logits["torch_eager_fp32"] > 0
    return {name: iou(v > 0, base) for name, v in logits.items()}


def _bench_heads(args: argparse.Namespace, ref: Any, engines: Path, runner: Callable) -> dict:
    """Heads on a 40-slot prompt (8 concept + 32 text), as in a reasoning request."""
    import torch

    from conceptseg.backends.ort import OrtGraph
    from conceptseg.masks import iou
    from conceptseg.samples import sample_target

    rows: dict[str, Any] = {}
    image = ref.encode_image(sample_target())
    heads = OrtGraph(engines, "sam3_heads", args.threads)
    fpn = [f.numpy() for f in image.vision.fpn_hidden_states[:3]]
    feeds = {"fpn0": fpn[0], "fpn1": fpn[1], "fpn2": fpn[2], **_heads_feeds(ref)}
    prompt, prompt_mask = feeds["prompt"][0], feeds["prompt_mask"][0]

    def torch_heads() -> np.ndarray:
        out = ref.heads(image, torch.from_numpy(prompt[None]), torch.from_numpy(prompt_mask[None]))
        return out.semantic_seg[0, 0].numpy()

    def ort_heads() -> np.ndarray:
        return heads.run(**feeds)["semantic_logits"][0, 0]

    contenders = {"torch_eager_fp32": torch_heads, "ort_fp32": ort_heads}
    for name, graph in _ov_graphs(args, engines, "sam3_heads", ("fp32",)).items():
        contenders[name] = lambda g=graph: g.run(**feeds)["semantic_logits"][0, 0]
    result = side_by_side(contenders, args.repeats, args.warmup, runner)
    base = result["outputs"]["torch_eager_fp32"]
    for name, times in result["times"].items():
        out = result["outputs"][name]
        rows[f"heads/{name}"] = summary(times) | {
            "max_abs_vs_torch": max_abs([out], [base]),
            "mask_iou_vs_torch": iou(out > 0, base > 0),
        }
    return rows


def _bench_text(args: argparse.Namespace, ref: Any, engines: Path, runner: Callable) -> dict:
    import torch

    from conceptseg.backends.ort import OrtGraph

    rows: dict[str, Any] = {}
    text = OrtGraph(engines, "sam3_text", args.threads)
    ids, ids_mask = ref.tokenize("the mug with a handle")

    def torch_text() -> np.ndarray:
        with torch.inference_mode():
            ids_t, mask_t = torch.from_numpy(ids), torch.from_numpy(ids_mask)
            return ref.model.get_text_features(
                input_ids=ids_t, attention_mask=mask_t
            ).pooler_output.numpy()

    contenders = {"torch_eager_fp32": torch_text}
    graphs = {"ort_fp32": text} | _ov_graphs(args, engines, "sam3_text", ("fp32",))
    for name, graph in graphs.items():
        contenders[name] = lambda g=graph: g.run(input_ids=ids, attention_mask=ids_mask)["text_features"]
    result = side_by_side(contenders, args.repeats, args.warmup, runner)
    for name, times in result["times"].items():
        rows[f"text/{name}"] = summary(times) | {
            "max_abs_vs_torch": max_abs(
                [result["outputs"][name]], [result["outputs"]["torch_eager_fp32"]]
            )
        }
    return rows


