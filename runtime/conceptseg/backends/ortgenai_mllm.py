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

Concurrent requests (``open`` / ``step`` / ``finish``, what ``serving.scheduler`` drives):
ort-genai 0.18's ``Engine``/``Request`` continuous batching takes token ids only (no images, no
suppressed ids, no hidden-state output), so it cannot run our decision rule. Instead each
request's prompt runs through its own generator as above (vision, embedding, prefill), its KV
cache is read out (``present.*``) and the generator dropped; decode steps then run the exported
decoder ``model.onnx`` in one onnxruntime session over every running sequence at once: KV right
padded to the longest, ``attention_mask`` ones over each row's own length (GroupQueryAttention
reads each row's length from it), each row's own M-RoPE position (the prompt's last + 1, all
three axes). The rule, the stop ids and the budget are per sequence. One sequence alone gives
exactly ``generate``'s tokens; in a batch, the same tokens and states within 1e-4 (fp32).

Prefix reuse: not possible with this library version. ort-genai runs the vision model only on a
generator's first ``append_tokens``/``set_inputs`` (later calls embed image placeholders with an
empty feature table), and a generator's KV cache cannot be copied, so a cached prefix that ends
with the mosaic cannot be continued with a new target image. Each request prefills in full.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from conceptseg.models import qwen
from conceptseg.protocols import Generation
from conceptseg.textstream import OnText, TextStream, tokenizer_stream
from conceptseg.types import RequestError


@dataclass(eq=False)
class Sequence:
    """One request's decoding state in a batch (its rule state, its budget, its outputs)."""

    seen: np.ndarray  # prompt + completion ids: the repetition penalty's
    prompt_tokens: int
    budget: int
    position: int  # M-RoPE position of the next input token (the same on all three axes)
    logits: np.ndarray  # (V,) for the next choice
    kv: list[np.ndarray] | None  # per layer (1, kv_heads, length, head) until it joins a batch
    length: int  # KV entries held
    stream: TextStream | None
    prefill_ms: float
    started: float = field(default_factory=time.perf_counter)
    tokens: list[int] = field(default_factory=list)
    states: list[np.ndarray] = field(default_factory=list)
    stopped: bool = False
    done: bool = False


def _session_options(threads: int | None) -> Any:
    import onnxruntime as ort  # heavy: onnxruntime, loaded with a session

    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    return options


class _Stepping:
    """``open``/``step``/``finish``: batched decode steps over concurrent sequences (mixed into
    :class:`OrtGenaiMllm`; the module docstring says how)."""

    def _sessions(self: Any) -> None:
        import onnxruntime as ort  # heavy: onnxruntime, loaded with a session

        if self._decoder is None:
            options = _session_options(self.threads)
            self._embed = ort.InferenceSession(str(self.model_dir / "embedding.onnx"), options)
            decoder = ort.InferenceSession(str(self.model_dir / "model.onnx"), options)
            self._decoder = decoder
            self._layers = sum(i.name.endswith(".key") for i in decoder.get_inputs())

    def open(
        self: Any,
        messages: list[dict[str, Any]],
        images: list[Image.Image],
        on_text: OnText | None = None,
    ) -> Sequence:
        """Prefill one request (vision, embedding, prompt); it joins the batch at ``step``."""
        self._sessions()
        inputs = self.prompt_inputs(messages, images)
        seen = np.asarray(inputs["input_ids"][0], dtype=np.int64)
        prompt = len(seen)
        budget = max(0, min(self.max_new_tokens, self.max_length - prompt))
        t0 = time.perf_counter()
        generator = self._generator(inputs, prompt + 1)
        logits = np.asarray(generator.get_logits(), np.float32).reshape(-1)
        kv = []
        for i in range(self._layers):  # (1, kv_heads, max_length, head): the prompt's part
            for kind in ("key", "value"):
                kv.append(np.array(generator.get_output(f"present.{i}.{kind}")[:, :, :prompt]))
        position = int(np.asarray(generator.get_input("position_ids")).max()) + 1
        del generator  # its KV buffer: the copy above is the sequence's own
        stream = tokenizer_stream(self.processor.tokenizer, on_text)
        prefill_ms = (time.perf_counter() - t0) * 1e3
        seq = Sequence(seen, prompt, budget, position, logits, kv, prompt, stream, prefill_ms)
        seq.done = budget == 0
        return seq

    def step(self: Any, seqs: list[Sequence]) -> None:
        """One token for every running sequence in ``seqs``: choose it (each by its own rule),
        then feed the chosen tokens through the decoder in one batch for their states."""
        live = [s for s in seqs if not s.done]
        if not live:
            return
        chosen = []
        for seq in live:
            token = qwen.next_token(seq.logits, seq.seen, self.repetition_penalty)
            seq.tokens.append(token)
            seq.seen = np.append(seq.seen, token)
            if seq.stream is not None:
                seq.stream.push(token)
            chosen.append(token)
        kv = self._batch_kv(live)
        width = max(s.length for s in live) + 1  # KV slots after this step
        mask = np.zeros((len(live), width), np.int64)
        for row, seq in enumerate(live):
            mask[row, : seq.length + 1] = 1
        ids = np.array(chosen, np.int64)[:, None]  # (B, 1)
        no_image = np.zeros((0, self.hidden_size()), np.float32)
        embeds = self._embed.run(None, {"input_ids": ids, "image_features": no_image})[0]
        feeds = {
            "inputs_embeds": embeds,
            "attention_mask": mask,
            "position_ids": np.repeat(np.array([[s.position] for s in live], np.int64)[None], 3, 0),
        }
        for i in range(self._layers):
            feeds[f"past_key_values.{i}.key"] = kv[2 * i]
            feeds[f"past_key_values.{i}.value"] = kv[2 * i + 1]
        names = ["logits", "hidden_states"] + [
            f"present.{i}.{k}" for i in range(self._layers) for k in ("key", "value")
        ]
        logits, hidden, *present = self._decoder.run(names, feeds)
        self._batch = (tuple(id(s) for s in live), present)
        for row, seq in enumerate(live):
            seq.logits = logits[row, -1]
            seq.states.append(np.array(hidden[row, -1], np.float32))
            seq.length += 1
            seq.position += 1
            if chosen[row] in self.stop_ids:
                seq.stopped = seq.done = True
            elif len(seq.tokens) >= seq.budget:
                seq.done = True

    def _batch_kv(self: Any, live: list[Sequence]) -> list[np.ndarray]:
        """The batch's KV per layer (B, kv_heads, P, head), right padded: last step's present
        when the batch is the same sequences, else rebuilt from each row's own part."""
        key = tuple(id(s) for s in live)
        if self._batch is not None and self._batch[0] == key:
            return self._batch[1]
        previous = {k: row for row, k in enumerate(self._batch[0])} if self._batch else {}
        rows = []
        for seq in live:  # each row's own KV (1, kv_heads, length, head) per layer
            if seq.kv is None:
                row = previous[id(seq)]
                seq.kv = [a[row : row + 1, :, : seq.length] for a in self._batch[1]]
            rows.append(seq.kv)
        width = max(s.length for s in live)
        kv = []
        for layer in range(len(rows[0])):
            parts = [r[layer] for r in rows]
            out = np.zeros((len(parts), *parts[0].shape[1:2], width, parts[0].shape[3]), np.float32)
            for b, part in enumerate(parts):
                out[b, :, : part.shape[2]] = part
            kv.append(out)
        for seq in live:
            seq.kv = None  # held by the batch from now on
        return kv

    def release(self: Any, seq: Sequence) -> None:
        """``seq`` leaves the batch (finished or cancelled): its rows go, the others' stay."""
        if self._batch is not None and id(seq) in self._batch[0]:
            ids = self._batch[0]
            keep = [i for i, k in enumerate(ids) if k != id(seq)]
            self._batch = (tuple(ids[i] for i in keep), [a[keep] for a in self._batch[1]])
        seq.kv, seq.done = None, True

    def finish(self: Any, seq: Sequence) -> Generation:
        """The sequence's generation (its stream finished); call once it is ``done``."""
        tokenizer = self.processor.tokenizer
        text = tokenizer.decode(seq.tokens, skip_special_tokens=True)
        if seq.stream is not None:
            seq.stream.finish(text)
        empty = np.zeros((0, self.hidden_size()), np.float32)
        hidden = np.stack(seq.states) if seq.states else empty
        decode_ms = (time.perf_counter() - seq.started) * 1e3 - seq.prefill_ms
        return Generation(text, seq.tokens, hidden, seq.prompt_tokens, seq.stopped,
                          seq.prefill_ms, decode_ms)  # fmt: skip


class OrtGenaiMllm(_Stepping):
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
        self.threads = threads
        self._decoder: Any = None  # the batched decode session, made at the first ``open``
        self._embed: Any = None
        self._batch: tuple[tuple[int, ...], list[np.ndarray]] | None = None  # (seq ids, KV)
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
        if not hasattr(self, "_hidden_size"):
            config = json.loads((self.model_dir / "genai_config.json").read_text())
            self._hidden_size = int(config["model"]["decoder"]["hidden_size"])
        return self._hidden_size
