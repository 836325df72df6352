"""The reference MLLM backend: transformers' Qwen2.5-VL, greedy decoding with a KV cache.

The exact one-at-a-time reference: one generation at a time, never batched (the ``mllm``
model's scheduler gives it one slot; ort-genai and trtllm batch concurrent requests and are
checked against it).

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

Prefix reuse (opt-in, ``prefix_cache=N``): requests with the same references share the prompt up
to and including the mosaic image (system turn, user turn start, ``<|vision_start|>`` 441 pads
``<|vision_end|>``). Its KV cache is kept in an LRU of N entries keyed by the exact prefix ids
and a hash of the mosaic image (mode, size, bytes); a hit skips the mosaic's vision tower and
the prefix's prefill. Positions come from ``get_rope_index`` over the whole prompt, so the
suffix is placed exactly as in a one-shot prefill (tokens identical; states equal to rounding).
"""

from __future__ import annotations

import copy
import hashlib
import time
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from transformers import Qwen2_5_VLForConditionalGeneration

from conceptseg.models import decode_attention, qwen, qwen_torch, weight_only
from conceptseg.models.qwen import VISION_END_ID
from conceptseg.protocols import Generation
from conceptseg.textstream import OnText, tokenizer_stream

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
# bf16 model, decode steps on weight-only int4 / int8 copies of the decoder and LM head
DECODE_MODES = weight_only.MODES
PRECISIONS = (*DTYPES, *DECODE_MODES)


def load_qwen(directory: Path, dtype: torch.dtype) -> Any:
    qwen.quiet_transformers()
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(directory, dtype=dtype)
    return model.eval()


def load_for_precision(directory: Path, precision: str) -> Any:
    """The model for ``precision`` (one of :data:`PRECISIONS`): fp32 / bf16 as loaded, or bf16
    with its text decoder's and LM head's linear layers swapped for
    :class:`~conceptseg.models.weight_only.DecodeLinear` (the vision tower only prefills). Except
    in fp32 (the exact reference: transformers as it is), the text decoder's one-query steps run
    :mod:`~conceptseg.models.decode_attention` (float32 math; ``decode_attention.stock(model)``
    puts transformers' SDPA back)."""
    assert precision in PRECISIONS, f"precision {precision!r} is not one of {PRECISIONS}"
    model = load_qwen(directory, DTYPES.get(precision, torch.bfloat16))
    if precision != "fp32":
        decode_attention.use(model)
    if precision in DECODE_MODES:
        kept = weight_only.quantize_decode(model.model.language_model, precision)
        assert not kept, f"{precision} kernels do not take these layers' shapes: {kept}"
        model.lm_head = weight_only.DecodeLinear(model.lm_head, precision)
    return model


@contextmanager
def as_transformers_runs_it(model: Any) -> Iterator[None]:
    """Within: ``model`` computes as transformers loads and runs it (for benchmarks and the
    reference recipe on a shared model): every weight-only layer on its own bf16 weight, the
    text decoder on SDPA. Outside: as it was."""
    layers = [m for m in model.modules() if isinstance(m, weight_only.DecodeLinear)]
    rows = [layer.max_rows for layer in layers]
    attention = model.config.text_config._attn_implementation
    for layer in layers:
        layer.max_rows = 0
    decode_attention.stock(model)
    try:
        yield
    finally:
        for layer, n in zip(layers, rows, strict=True):
            layer.max_rows = n
        model.set_attn_implementation({"text_config": attention})


class PrefixCache:
    """LRU of prompt-prefix KV caches. ``get`` and ``put`` copy, so a cached prefix is never
    extended by the request that uses it. ``hits``/``misses`` count lookups."""

    def __init__(self, capacity: int) -> None:
        assert capacity > 0, f"capacity must be positive, got {capacity}"
        self.capacity = capacity
        self.entries: OrderedDict[tuple[Any, ...], Any] = OrderedDict()
        self.hits = self.misses = 0

    def get(self, key: tuple[Any, ...]) -> Any:
        if key not in self.entries:
            self.misses += 1
            return None
        self.hits += 1
        self.entries.move_to_end(key)
        return copy.deepcopy(self.entries[key])

    def put(self, key: tuple[Any, ...], cache: Any) -> None:
        self.entries[key] = copy.deepcopy(cache)
        self.entries.move_to_end(key)
        while len(self.entries) > self.capacity:
            self.entries.popitem(last=False)


def prefix_split(inputs: Any) -> int:
    """Prompt length up to and including the first image (the mosaic), 0 when the prompt has
    fewer than two images (nothing follows the first image that a cached prefix could serve)."""
    grid = inputs.get("image_grid_thw")
    if grid is None or len(grid) < 2:
        return 0
    ends = (inputs["input_ids"][0] == VISION_END_ID).nonzero()
    return int(ends[0, 0]) + 1 if len(ends) else 0


class HfMllm:
    """``generate(messages, images) -> Generation`` on a local ConceptSeg-R1 checkpoint.

    The exact reference: one request at a time (a ``generate`` call holds the model to the end),
    in fp32 (``precision="bf16"`` halves the memory). ``precision="int4"`` / ``"int8"``: the
    fastest CPU path, bf16 prefill (AMX tiles or AVX-512 BF16) and decode steps on weight-only
    int4 (group 32) / int8 copies of the decoder and LM head (:mod:`conceptseg.models.weight_only`). Concurrent requests
    are batched by the ort-genai and trtllm backends, not here.
    """

    def __init__(
        self,
        directory: Path,
        *,
        precision: str = "fp32",
        max_new_tokens: int = 768,
        max_length: int = 2816,
        prefix_cache: int = 0,
    ) -> None:
        self.directory = Path(directory)
        self.model = load_for_precision(self.directory, precision)
        self.processor = qwen.load_processor(self.directory)
        rule = qwen.stop_rule(self.directory)
        self.stop_ids, self.repetition_penalty = set(rule.stop_ids), rule.repetition_penalty
        self.max_new_tokens = max_new_tokens
        self.max_length = max_length
        self.prefix_cache = PrefixCache(prefix_cache) if prefix_cache else None

    def prompt_inputs(self, messages: list[dict[str, Any]], images: list[Image.Image]) -> Any:
        return qwen.chat_inputs(self.processor, messages, images, tensors="pt")

    def _prefill_with_prefix(self, inputs: Any, split: int, mosaic: Image.Image) -> Any:
        """Prefill ``input_ids[:, split:]`` (and the images after the first) on top of the
        cached KV of ``input_ids[:, :split]`` (computed and stored on a miss). ``mosaic`` is the
        first image: its mode, size and pixel bytes identify the prefix with its token ids."""
        assert self.prefix_cache is not None
        model = self.model.model
        ids, mm, mask = inputs["input_ids"], inputs["mm_token_type_ids"], inputs["attention_mask"]
        grid, pixels = inputs["image_grid_thw"], inputs["pixel_values"]
        first = int(grid[0].prod())  # patches of the mosaic
        positions, deltas = model.get_rope_index(ids, mm, image_grid_thw=grid, attention_mask=mask)
        digest = hashlib.sha256(f"{mosaic.mode}{mosaic.size}".encode() + mosaic.tobytes())
        key = (tuple(ids[0, :split].tolist()), digest.hexdigest())
        pixels = pixels.to(self.model.dtype)
        cache = self.prefix_cache.get(key)
        if cache is None:
            cache = model(
                input_ids=ids[:, :split],
                attention_mask=mask[:, :split],
                position_ids=positions[:, :, :split],
                pixel_values=pixels[:first],
                image_grid_thw=grid[:1],
                mm_token_type_ids=mm[:, :split],
                use_cache=True,
            ).past_key_values
            self.prefix_cache.put(key, cache)
        out = model(
            input_ids=ids[:, split:],
            attention_mask=mask,
            position_ids=positions[:, :, split:],
            pixel_values=pixels[first:],
            image_grid_thw=grid[1:],
            mm_token_type_ids=mm[:, split:],
            past_key_values=cache,
            use_cache=True,
        )
        # decode steps place their tokens with it, as after a one-shot prefill
        model.rope_deltas = deltas
        return out

    @torch.inference_mode()
    def generate(
        self,
        messages: list[dict[str, Any]],
        images: list[Image.Image],
        on_text: OnText | None = None,
        forced: list[int] | None = None,
    ) -> Generation:
        """Greedy completion; ``on_text`` (optional) receives the text as deltas while decoding.
        With ``forced``, teacher forcing (as ``OrtGenaiMllm.decode``): ``forced`` is fed back
        instead of the model's choices; ``token_ids`` holds the choices, ``hidden`` the states of
        the forced tokens (for per-step agreement of a quantized decode with a reference)."""
        stream = tokenizer_stream(self.processor.tokenizer, on_text)
        inputs = self.prompt_inputs(messages, images)
        model = self.model
        dtype = model.dtype
        # 1) prefill: vision tower + prompt, building the KV cache
        t0 = time.perf_counter()
        split = prefix_split(inputs) if self.prefix_cache is not None else 0
        if split:
            out = self._prefill_with_prefix(inputs, split, images[0])
        else:
            out = model.model(
                **{k: v.to(dtype) if v.is_floating_point() else v for k, v in inputs.items()},
                use_cache=True,
            )
        logits = model.lm_head(out.last_hidden_state[:, -1])
        prefill_ms = (time.perf_counter() - t0) * 1e3
        cache, seen = out.past_key_values, inputs["input_ids"]
        prompt_tokens = seen.shape[1]
        budget = min(self.max_new_tokens, self.max_length - prompt_tokens)
        if forced is not None:
            budget = min(budget, len(forced))
        tokens: list[int] = []
        states: list[torch.Tensor] = []
        stopped = False
        # 2) decode: each chosen token is fed back once; its output state is the CTM's key for it
        t1 = time.perf_counter()
        while len(tokens) < budget:
            choice = qwen_torch.next_token(logits, seen, self.repetition_penalty)
            tokens.append(choice)
            token = choice if forced is None else forced[len(tokens) - 1]
            if stream is not None:
                stream.push(choice)  # the text is the choices' (as OrtGenaiMllm.decode)
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
        if stream is not None:
            stream.finish(text)
        return Generation(text, tokens, hidden, prompt_tokens, stopped, prefill_ms, decode_ms)


@torch.inference_mode()
def full_forward_states(model: Any, inputs: Any, tokens: list[int]) -> np.ndarray:
    """What the reference code does after generating: one full forward (vision tower and all)
    over prompt + ``tokens``; the final-norm states at every position, (L, H) float32. The
    backends capture these while decoding instead; tests and benchmarks compare against this."""
    inputs = dict(inputs)
    prompt = inputs["input_ids"].shape[1]
    extra = torch.tensor([tokens], dtype=inputs["input_ids"].dtype)
    for key, value in list(inputs.items()):
        if key == "input_ids":
            inputs[key] = torch.cat([value, extra], dim=1)
        elif value.dim() == 2 and value.shape == (1, prompt):  # attention mask, token types
            fill = torch.ones_like(extra) if key == "attention_mask" else torch.zeros_like(extra)
            inputs[key] = torch.cat([value, fill.to(value.dtype)], dim=1)
    dtype = model.dtype
    moved = {k: (v.to(dtype) if v.is_floating_point() else v).to(model.device) for k, v in inputs.items()}
    return model.model(**moved).last_hidden_state[0].float().cpu().numpy()
