"""``conceptseg bench request``: one whole reasoning request, our pipeline vs the reference code's
recipe, on the same weights (the same loaded model objects) and the same request, side by side.

- ``reference_recipe``: how the reference implementation runs a request (METHOD.md sections 1
  and 5), re-enacted with the same modules: SAM 3 encodes the target for the router probe and
  runs the heads on the question (even when no presence could pass the threshold); the MLLM
  answers with ``model.generate`` (greedy, the checkpoint's repetition penalty); then one full
  forward of the whole model (vision tower, all tokens, LM head) with ``output_hidden_states``
  gives the CTM its keys; SAM 3 encodes the target *again*, encodes the answer's text and runs
  the heads with the concept tokens. No cache anywhere (no image-feature reuse, no text cache,
  no prefix cache). Two concessions, both without cost: generation suppresses the vision special
  tokens (a trained model never emits them; random weights do), and the chat prompt, mosaic and
  tag parsing are our pure modules (string work, identical by construction).
- ``ours``: ``build_pipeline`` (``--backend`` for SAM 3 and the CTM, the hf backend for the MLLM):
  image features computed once, the probe skipped when no score can pass, the CTM's keys captured
  while decoding, one-query attention as float32 matmuls, caches cold for every request unless
  ``--prefix-cache N`` (then warm after the first repeat: say so when quoting it). With
  ``--mllm-precision int4`` / ``int8`` its decode steps run weight-only copies of the decoder
  (bf16 prefill); the recipe always runs the model as transformers does (``as_transformers_runs_it``:
  the bf16 weights, SDPA), so int4 / int8 change the answer: the row says by how much.

Both decode exactly ``--new-tokens`` tokens unless ``--stop`` (random weights rarely stop).
Same answer: the same completion tokens, answer phrase and route; same mask: IoU of the two masks.
Per-step breakdown: medians over the repeats of each step's time.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from conceptseg.benchmark import RUNNERS, row, side_by_side, summary, synchronize


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--backend", default="torch", choices=["torch", "onnxruntime", "openvino"],
                        help="ours: SAM 3 + CTM backend (the recipe always runs torch fp32)")  # fmt: skip
    parser.add_argument("--mllm-precision", default="bf16", choices=["fp32", "bf16", "int4", "int8"],
                        help="the MLLM's dtype (one loaded model); int4 / int8: ours decodes on "
                             "weight-only copies, the recipe runs the same model's bf16 weights")  # fmt: skip
    parser.add_argument("--sam3-precision", default="fp32",
                        help="ours: fp32, bf16 (torch autocast, openvino) or int8 (onnxruntime)")  # fmt: skip
    parser.add_argument("--new-tokens", type=int, default=200, help="completion tokens")
    parser.add_argument("--stop", action="store_true", help="honour the stop ids")
    parser.add_argument("--prefix-cache", type=int, default=0, help="ours: prefix LRU size")


class _Clock:
    def __init__(self) -> None:
        self.ms: dict[str, float] = {}

    @contextmanager
    def step(self, name: str) -> Iterator[None]:
        synchronize()
        start = time.perf_counter()
        try:
            yield
        finally:
            synchronize()
            self.ms[name] = self.ms.get(name, 0.0) + (time.perf_counter() - start) * 1e3


class ReferenceRecipe:
    """The reference code's request, over the same SAM 3, MLLM and CTM objects as ours."""

    def __init__(self, sam: Any, mllm: Any, ctm: Any, config: Any, stop: bool) -> None:
        self.sam, self.mllm, self.ctm, self.cfg = sam, mllm, ctm, config
        self.stop = stop

    def run(self, request: Any) -> dict[str, Any]:
        from conceptseg.backends.hf_mllm import as_transformers_runs_it

        with as_transformers_runs_it(self.mllm.model):
            return self._run(request)

    def _run(self, request: Any) -> dict[str, Any]:
        import torch  # heavy: the reference recipe is torch code

        from conceptseg import prompt, router, tags
        from conceptseg.masks import logits_to_mask
        from conceptseg.mosaic import build_mosaic, resize_target

        clock, question = _Clock(), request.question.strip()
        size_hw = (request.image.height, request.image.width)
        with torch.inference_mode():
            # 1) probe: encode the target, heads on the question (the reference always runs it)
            with clock.step("sam3_image"):
                features = self._encode(request.image)
            with clock.step("router_probe"):
                sam_text = router.strip(question) if self.cfg.strip_parentheticals else question
                probe = self._segment(features, sam_text, None)
            threshold = router.threshold(question, strip_parentheticals=self.cfg.strip_parentheticals)
            if self.cfg.router and router.accepts(probe.presence, threshold,
                                                  inclusive=self.cfg.inclusive_threshold):  # fmt: skip
                mask = logits_to_mask(probe.semantic_logits, size_hw)
                return {"route": "fast", "mask": mask, "tokens": [], "text": "", "answer": "",
                        "timings_ms": clock.ms}  # fmt: skip
            with clock.step("prompt"):
                mosaic = build_mosaic(request.references) if request.references else None
                messages = prompt.messages(question, mosaic)
                target = resize_target(request.image)
                images = [target] if mosaic is None else [mosaic.image, target]
                inputs = self.mllm.prompt_inputs(messages, images)
            # 2) greedy generate, 3) a full forward of the whole model for the hidden states
            with clock.step("mllm_generate"):
                tokens = self._generate(inputs)
            with clock.step("mllm_full_forward"):
                hidden = self._full_forward(inputs, tokens)
            text = self.mllm.processor.tokenizer.decode(tokens, skip_special_tokens=True)
            answer = tags.parse(text)
            with clock.step("ctm"):
                concept = self.ctm(hidden) if len(hidden) else None
            # 4) SAM 3 encodes the target again, then the heads on the answer + concept tokens
            with clock.step("sam3_image_again"):
                features = self._encode(request.image)
            with clock.step("sam3_segment"):
                out = self._segment(features, answer.answer, concept)
            with clock.step("postprocess"):
                mask = logits_to_mask(out.semantic_logits, size_hw)
        return {"route": "reason", "mask": mask, "tokens": tokens, "text": text,
                "answer": answer.answer, "timings_ms": clock.ms}  # fmt: skip

    def _encode(self, image: Any) -> Any:
        import torch  # heavy: the reference recipe is torch code

        from conceptseg.backends.torch_ref import Sam3Image
        from conceptseg.models.sam3_inputs import preprocess

        pixels = torch.from_numpy(preprocess(image, self.sam.side)).to(self.sam.device)
        return Sam3Image(self.sam.model.get_vision_features(pixel_values=pixels))

    def _segment(self, features: Any, text: str, concept: np.ndarray | None) -> Any:
        """Text features computed afresh (no cache), concept tokens prepended, the heads."""
        import torch  # heavy: the reference recipe is torch code

        from conceptseg.backends.torch_ref import seg_output

        ids, mask = (torch.from_numpy(a).to(self.sam.device) for a in self.sam.tokenize(text))
        feats = self.sam.model.get_text_features(input_ids=ids, attention_mask=mask).pooler_output
        if concept is not None:
            tokens = torch.from_numpy(np.asarray(concept, np.float32))[None].to(feats)
            feats = torch.cat([tokens, feats], dim=1)
            mask = torch.cat([torch.ones(1, tokens.shape[1], dtype=mask.dtype), mask], dim=1)
        return seg_output(self.sam.heads(features, feats, mask))

    def _generate(self, inputs: Any) -> list[int]:
        from transformers import GenerationConfig  # heavy: the reference's generate

        from conceptseg.models.qwen import ENDOFTEXT_ID, VISION_TOKEN_IDS

        model, prompt_len = self.mllm.model, inputs["input_ids"].shape[1]
        budget = min(self.cfg.max_new_tokens, self.cfg.max_length - prompt_len)
        config = GenerationConfig(
            do_sample=False, max_new_tokens=budget, repetition_penalty=self.mllm.repetition_penalty,
            eos_token_id=sorted(self.mllm.stop_ids) if self.stop else None,
            pad_token_id=ENDOFTEXT_ID, suppress_tokens=list(VISION_TOKEN_IDS),
            temperature=None, top_p=None, top_k=None,
        )  # fmt: skip
        moved = {k: v.to(model.dtype) if v.is_floating_point() else v for k, v in inputs.items()}
        out = model.generate(**moved, generation_config=config)
        return [int(t) for t in out[0, prompt_len:]]

    def _full_forward(self, inputs: Any, tokens: list[int]) -> np.ndarray:
        """The reference's second pass: the whole model (LM head included) over prompt +
        completion, ``output_hidden_states=True``; the last (final-norm) states at the positions
        where each completion token is the input, (L, H) float32."""
        import torch  # heavy: the reference recipe is torch code

        extended = dict(inputs)
        prompt_len = inputs["input_ids"].shape[1]
        extra = torch.tensor([tokens], dtype=inputs["input_ids"].dtype)
        for key, value in inputs.items():
            if key == "input_ids":
                extended[key] = torch.cat([value, extra], dim=1)
            elif value.dim() == 2 and value.shape == (1, prompt_len):  # attention mask, token types
                fill = torch.ones_like(extra) if key == "attention_mask" else torch.zeros_like(extra)
                extended[key] = torch.cat([value, fill.to(value.dtype)], dim=1)
        model = self.mllm.model
        moved = {k: v.to(model.dtype) if v.is_floating_point() else v for k, v in extended.items()}
        out = model(**moved, output_hidden_states=True)
        return out.hidden_states[-1][0, prompt_len:].float().numpy()


def _ours(pipeline: Any, request: Any) -> dict[str, Any]:
    seg = pipeline.seg
    if hasattr(seg, "_text"):
        seg._text.clear()  # cold text cache: every request pays its text encodings
    result = pipeline.run(request)
    ms = dict(result.timings_ms)
    mllm = ms.pop("mllm", 0.0)
    ms["mllm_other"] = max(mllm - ms.get("mllm_prefill", 0.0) - ms.get("mllm_decode", 0.0), 0.0)
    return {"route": result.route, "mask": result.mask, "tokens": list(pipeline.last_tokens),
            "text": result.text, "answer": result.answer.answer, "timings_ms": ms}  # fmt: skip


def _capture_tokens(pipeline: Any) -> None:
    """Keep the last generation's token ids on the pipeline (``Result`` has only their count)."""
    generate = pipeline.mllm.generate
    pipeline.last_tokens = []

    def recording(*args: Any, **kwargs: Any) -> Any:
        generation = generate(*args, **kwargs)
        pipeline.last_tokens = generation.token_ids
        return generation

    pipeline.mllm.generate = recording


def build_contenders(args: argparse.Namespace) -> tuple[Any, ReferenceRecipe]:
    from conceptseg.backends.torch_ref import TorchSam3, torch_ctm
    from conceptseg.build import GRAPH_BACKENDS, build_pipeline
    from conceptseg.config import PipelineConfig

    weights = Path(args.weights)
    config = PipelineConfig(max_new_tokens=args.new_tokens)
    engines = Path(args.engines) if args.backend in GRAPH_BACKENDS else None
    pipeline = build_pipeline(weights, backend=args.backend, engines=engines, config=config,
                              threads=args.threads, mllm_precision=args.mllm_precision,
                              prefix_cache=args.prefix_cache,
                              sam3_precision=args.sam3_precision)  # fmt: skip
    if not args.stop:
        pipeline.mllm.stop_ids = set()  # exactly --new-tokens steps, whatever random weights pick
    _capture_tokens(pipeline)
    same_torch = args.backend == "torch" and args.sam3_precision == "fp32"
    sam = pipeline.seg if same_torch else TorchSam3(weights / "sam3")
    ctm = pipeline.ctm if args.backend == "torch" else torch_ctm(weights / "mllm")
    return pipeline, ReferenceRecipe(sam, pipeline.mllm, ctm, config, args.stop)


def run(args: argparse.Namespace) -> dict[str, Any]:
    import torch  # heavy: both contenders are torch at heart

    from conceptseg.masks import iou
    from conceptseg.samples import sample_request

    torch.set_num_threads(args.threads)
    pipeline, recipe = build_contenders(args)
    request = sample_request()
    runs: dict[str, list[dict[str, Any]]] = {"reference_recipe": [], "ours": []}

    def recorded(name: str, fn: Any) -> Any:
        def call() -> Any:
            out = fn(request)
            runs[name].append(out)
            total = sum(out["timings_ms"].values()) / 1e3
            print(f"  {name}: {out['route']}, {len(out['tokens'])} tokens, {total:.2f} s", flush=True)
            return out

        return call

    contenders = {"reference_recipe": recorded("reference_recipe", recipe.run),
                  "ours": recorded("ours", lambda r: _ours(pipeline, r))}  # fmt: skip
    result = side_by_side(contenders, args.repeats, args.warmup, RUNNERS[args.runner])
    ref, ours = result["outputs"]["reference_recipe"], result["outputs"]["ours"]
    n = max(len(ref["tokens"]), len(ours["tokens"]), 1)
    agree = sum(a == b for a, b in zip(ref["tokens"], ours["tokens"], strict=False)) / n
    same = {"same_route": ref["route"] == ours["route"], "same_tokens": ref["tokens"] == ours["tokens"],
            "same_answer": ref["answer"] == ours["answer"] and ref["text"] == ours["text"],
            "token_agreement": agree, "mask_iou": iou(ref["mask"], ours["mask"])}  # fmt: skip
    out: dict[str, Any] = {"request": {"question": request.question, "references": len(request.references),
                                       "image_size": list(request.image.size)}}  # fmt: skip
    for name, times in result["times"].items():
        kept = runs[name][args.warmup :]  # the recorder also saw the warm-up rounds
        steps = list(dict.fromkeys(k for r in kept for k in r["timings_ms"]))
        out[name] = {
            "total": summary(times),
            "breakdown_ms": {s: statistics.median(r["timings_ms"].get(s, 0.0) for r in kept)
                             for s in steps},  # fmt: skip
            "route": runs[name][-1]["route"],
            "new_tokens": len(runs[name][-1]["tokens"]),
            "answer": runs[name][-1]["answer"],
        }
    out["ours"]["vs_reference_recipe"] = same | {
        "speedup": out["reference_recipe"]["total"]["median_ms"] / out["ours"]["total"]["median_ms"]
    }
    return out


def rows(results: dict[str, Any]) -> list[dict[str, Any]]:
    """The recipe first (the baseline of ``speedup``), then ours with the same-answer checks."""
    out = []
    for name in ("reference_recipe", "ours"):
        r = results[name]
        vs = r.get("vs_reference_recipe")
        quality = ({"same_answer": vs["same_answer"] and vs["same_tokens"] and vs["same_route"],
                    "token_agreement": vs["token_agreement"], "mask_iou": vs["mask_iou"]}
                   if vs else {"same_answer": True, "token_agreement": 1.0, "mask_iou": 1.0})  # fmt: skip
        out.append(row("reasoning request", name, r["total"], route=r["route"],
                       new_tokens=r["new_tokens"], breakdown_ms=r["breakdown_ms"], **quality))  # fmt: skip
    return out


def print_table(results: dict[str, Any]) -> None:
    steps = list(dict.fromkeys(k for n in ("reference_recipe", "ours")
                               for k in results[n]["breakdown_ms"]))  # fmt: skip
    print(f"{'step (median ms)':20} {'reference_recipe':>17} {'ours':>10}")
    for step in steps:
        cells = [results[n]["breakdown_ms"].get(step) for n in ("reference_recipe", "ours")]
        print(f"{step:20} " + " ".join(f"{'-' if c is None else f'{c:.1f}':>{w}}"
                                      for c, w in zip(cells, (17, 10), strict=True)))  # fmt: skip
    vs = results["ours"]["vs_reference_recipe"]
    print(f"ours vs reference recipe: {vs['speedup']:.2f}x; same tokens {vs['same_tokens']}, "
          f"same answer {vs['same_answer']}, mask IoU {vs['mask_iou']:.4f}")  # fmt: skip
