"""The reference MLLM backend: transformers' Qwen2.5-VL, greedy decoding with a KV cache.

Differences from the reference code, all on purpose:
- the CTM's keys are captured while decoding: every generated token is fed back through the
  model once (the stop token too, one extra step), and the final-norm state at that position is
  kept. The reference instead re-runs the whole model (vision tower included) after generation.
  ``tests/models`` checks the captured states against such a full re-forward.
- the vision special tokens are suppressed, so a completion can never contain an image
  placeholder (a trained model does not emit them; random weights do).
Kept from the reference: greedy decoding, the checkpoint's ``generation_config.json`` stop ids
and repetition penalty (transformers applies the penalty even when ``do_sample=False``), a cap of
``max_new_tokens`` and of ``max_length`` tokens in all, ``skip_special_tokens`` decoding.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from conceptseg.backends.base import Generation

VISION_TOKEN_IDS = (151652, 151653, 151654, 151655, 151656)  # vision start/end/pad, image/video pad


def quiet_transformers() -> None:
    """Load reports list the CTM keys as "unexpected" for the MLLM class; they are expected here."""
    from transformers.utils import logging

    logging.set_verbosity_error()
    logging.disable_progress_bar()


def load_qwen(directory: Path, dtype: torch.dtype) -> Any:
    from transformers import Qwen2_5_VLForConditionalGeneration

    quiet_transformers()
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(directory, dtype=dtype)
    return model.eval()


def apply_repetition_penalty(
    logits: torch.Tensor, seen: torch.Tensor, penalty: float
) -> torch.Tensor:
    """transformers' rule: logits of already-seen ids are divided (>0) or multiplied (<0)."""
    if penalty == 1.0:
        return logits
    picked = logits.gather(-1, seen)
    picked = torch.where(picked < 0, picked * penalty, picked / penalty)
    return logits.scatter(-1, seen, picked)


class HfMllm:
    """``generate(messages, images) -> Generation`` on a local ConceptSeg-R1 checkpoint."""

    def __init__(
        self,
        directory: Path,
        *,
        dtype: torch.dtype = torch.float32,
        max_new_tokens: int = 768,
        max_length: int = 2816,
    ) -> None:
        from transformers import AutoProcessor

        self.directory = Path(directory)
        self.model = load_qwen(self.directory, dtype)
        self.processor = AutoProcessor.from_pretrained(self.directory)
        gen = (
            json.loads((self.directory / "generation_config.json").read_text())
            if (self.directory / "generation_config.json").exists()
            else {}
        )
        eos = gen.get("eos_token_id", self.model.config.text_config.eos_token_id)
        self.stop_ids = set(eos if isinstance(eos, list) else [eos])
        self.repetition_penalty = float(gen.get("repetition_penalty", 1.0))
        self.max_new_tokens = max_new_tokens
        self.max_length = max_length

    def prompt_inputs(self, messages: list[dict[str, Any]], images: list[Image.Image]) -> Any:
        text = self.processor.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=True
        )
        return self.processor(text=[text], images=images, return_tensors="pt")

    def _next_token(self, logits: torch.Tensor, seen: torch.Tensor) -> int:
        logits = apply_repetition_penalty(logits.float(), seen, self.repetition_penalty)
        logits[..., list(VISION_TOKEN_IDS)] = -torch.inf
        return int(logits.argmax(-1))

    @torch.inference_mode()
    def generate(self, messages: list[dict[str, Any]], images: list[Image.Image]) -> Generation:
        inputs = self.prompt_inputs(messages, images)
        model = self.model
        dtype = model.dtype
        # 1) prefill: vision tower + prompt, building the KV cache
        t0 = time.perf_counter()
        out = model.model(
            **{k: v.to(dtype) if v.is_floating_point() else v for k, v in inputs.items()},
            use_cache=True,
        )
        logits = model.lm_head(out.last_hidden_state[:, -1])
        prefill_ms = (time.perf_counter() - t0) * 1e3
        cache, seen = out.past_key_values, inputs["input_ids"]
        prompt_tokens = seen.shape[1]
        budget = min(self.max_new_tokens, self.max_length - prompt_tokens)
        tokens: list[int] = []
        states: list[torch.Tensor] = []
        stopped = False
        # 2) decode: each chosen token is fed back once; its output state is the CTM's key for it
        t1 = time.perf_counter()
        while len(tokens) < budget:
            token = self._next_token(logits, seen)
            tokens.append(token)
            step = torch.tensor([[token]])
            seen = torch.cat([seen, step], dim=1)
            out = model.model(input_ids=step, past_key_values=cache, use_cache=True)
            cache = out.past_key_values
            states.append(out.last_hidden_state[0, -1].float())
            if token in self.stop_ids:
                stopped = True
                break
            logits = model.lm_head(out.last_hidden_state[:, -1])
        decode_ms = (time.perf_counter() - t1) * 1e3
        hidden = (
            torch.stack(states).numpy()
            if states
            else np.zeros((0, model.config.text_config.hidden_size), np.float32)
        )
        text = self.processor.tokenizer.decode(tokens, skip_special_tokens=True)
        return Generation(text, tokens, hidden, prompt_tokens, stopped, prefill_ms, decode_ms)
