"""The MLLM on ONNX Runtime GenAI (``--mllm-backend ort-genai``): the CPU path, fp32 or int4.

Runs the graphs of ``conceptseg export --parts mllm`` (``ENGINES/mllm``) as ort-genai 0.18's
``qwen2_5_vl`` multimodal model: the vision tower, the embedding step and the text decoder all run
in ONNX Runtime; no torch model is loaded. Preprocessing is transformers' processor from
``ENGINES/mllm/processor`` (chat template, tokenizer, 600 -> 588 resize and patching), so the
model sees exactly the hf backend's ``input_ids`` and ``pixel_values``; ort-genai computes the
3D M-RoPE positions from ``input_ids`` and ``image_grid_thw`` as transformers' ``get_rope_index``.

Decoding is the hf backend's, step by step: ort-genai's search has a repetition penalty but no
way to suppress tokens, so the loop reads ``get_logits()``, applies ``models.qwen.next_token``
(the hf backend's rule: penalty, vision tokens suppressed, argmax) and feeds the choice
back with ``append_tokens``; that step's ``get_output("hidden_states")`` is the final-norm state
of the token as input, the CTM's key (the stop token included: one extra step).

Prefix reuse: not possible with this library version. ort-genai runs the vision model only on a
generator's first ``append_tokens``/``set_inputs`` (later calls embed image placeholders with an
empty feature table), and a generator's KV cache cannot be copied, so a cached prefix that ends
with the mosaic cannot be continued with a new target image. Each request prefills in full.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from conceptseg.models import qwen
from conceptseg.protocols import Generation
from conceptseg.textstream import OnText, tokenizer_stream
from conceptseg.types import RequestError


class OrtGenaiMllm:
    """``generate(messages, images) -> Generation`` on an exported ``ENGINES/mllm/<precision>``."""

    def __init__(
        self,
        model_dir: Path,
        *,
        max_new_tokens: int = 768,
        max_length: int = 2816,
        threads: int | None = None,
    ) -> None:
        import onnxruntime_genai as og  # optional: the ort-genai extra

        self.model_dir = Path(model_dir)
        if not (self.model_dir / "genai_config.json").exists():
            raise RequestError(
                "--engines",
                f"{self.model_dir} has no genai_config.json; export the MLLM with "
                "`conceptseg export --weights DIR --out ENGINES --parts mllm`",
            )
        config = og.Config(str(self.model_dir))
        config.clear_providers()  # CPU
        if threads:
            options = {"intra_op_num_threads": threads, "inter_op_num_threads": 1}
            sections = ("decoder", "embedding", "vision")
            config.overlay(
                json.dumps({"model": {s: {"session_options": options} for s in sections}})
            )
        self.model = og.Model(config)
        self.processor = qwen.load_processor(self.model_dir.parent / "processor")
        rule = qwen.stop_rule(self.model_dir.parent / "processor")
        self.stop_ids, self.repetition_penalty = set(rule.stop_ids), rule.repetition_penalty
        self.max_new_tokens = max_new_tokens
        self.max_length = max_length

    def prompt_inputs(self, messages: list[dict[str, Any]], images: list[Image.Image]) -> Any:
        return qwen.chat_inputs(self.processor, messages, images, tensors="np")

    def _generator(self, inputs: Any, max_length: int) -> Any:
        """A generator whose prompt (vision, embedding, decoder prefill) has run."""
        import onnxruntime_genai as og  # optional: the ort-genai extra

        params = og.GeneratorParams(self.model)
        params.set_search_options(max_length=max_length, do_sample=False)
        generator = og.Generator(self.model, params)
        named = og.NamedTensors()
        if "pixel_values" in inputs:
            grid = np.ascontiguousarray(inputs["image_grid_thw"], dtype=np.int64)  # (I, 3)
            named["pixel_values"] = np.ascontiguousarray(inputs["pixel_values"], dtype=np.float32)
            named["image_grid_thw"] = grid
            named["num_image_tokens"] = grid.prod(-1) // 4  # 2x2 patch merge
        named["input_ids"] = np.ascontiguousarray(inputs["input_ids"], dtype=np.int32)
        generator.set_inputs(named)  # runs vision, embedding and the decoder on the prompt
        return generator

    def generate(
        self,
        messages: list[dict[str, Any]],
        images: list[Image.Image],
        on_text: OnText | None = None,
    ) -> Generation:
        """Greedy completion; ``on_text`` (optional) receives the text as deltas while decoding."""
        return self.decode(messages, images, on_text=on_text)

    def decode(
        self,
        messages: list[dict[str, Any]],
        images: list[Image.Image],
        forced: list[int] | None = None,
        on_text: OnText | None = None,
    ) -> Generation:
        """Greedy decoding; with ``forced``, teacher forcing: ``forced`` is fed back instead of
        the model's choices, and ``token_ids`` holds the choices (what greedy decoding would have
        picked after each forced prefix), ``hidden`` the states of the forced tokens. Used to
        measure int4's per-step agreement without one early difference deciding all the rest."""
        tokenizer = self.processor.tokenizer
        stream = tokenizer_stream(tokenizer, on_text)
        inputs = self.prompt_inputs(messages, images)
        seen = np.asarray(inputs["input_ids"][0], dtype=np.int64)
        prompt_tokens = len(seen)
        budget = max(0, min(self.max_new_tokens, self.max_length - prompt_tokens))
        if forced is not None:
            budget = min(budget, len(forced))
        # 1) prefill: vision tower + embedding + prompt (one extra slot for the last state)
        t0 = time.perf_counter()
        generator = self._generator(inputs, prompt_tokens + budget + 1)
        logits = generator.get_logits()
        prefill_ms = (time.perf_counter() - t0) * 1e3
        tokens: list[int] = []
        states: list[np.ndarray] = []
        stopped = False
        # 2) decode: each chosen token is fed back once; its output state is the CTM's key for it
        t1 = time.perf_counter()
        while len(tokens) < budget:
            token = qwen.next_token(logits, seen, self.repetition_penalty)
            fed = token if forced is None else forced[len(tokens)]
            tokens.append(token)
            if stream is not None:
                stream.push(token)
            seen = np.append(seen, fed)
            generator.append_tokens(np.array([fed], dtype=np.int32))
            states.append(np.asarray(generator.get_output("hidden_states"), np.float32).reshape(-1))
            if fed in self.stop_ids:
                stopped = True
                break
            logits = generator.get_logits()
        decode_ms = (time.perf_counter() - t1) * 1e3
        hidden = np.stack(states) if states else np.zeros((0, self.hidden_size()), np.float32)
        text = tokenizer.decode(tokens, skip_special_tokens=True)
        if stream is not None:
            stream.finish(text)
        return Generation(text, tokens, hidden, prompt_tokens, stopped, prefill_ms, decode_ms)

    def hidden_size(self) -> int:
        config = json.loads((self.model_dir / "genai_config.json").read_text())
        return int(config["model"]["decoder"]["hidden_size"])
