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

Concurrent requests (``begin`` / ``prefill`` / ``step`` / ``finish``, what
``serving.scheduler`` drives): ort-genai 0.18's ``Engine``/``Request`` continuous batching takes
token ids only (no images, no suppressed ids, no hidden-state output), so it cannot run our
decision rule. Instead the exported graphs run in onnxruntime sessions of our own (ort-genai's
``Model`` is not loaded for them: one copy of the weights):
- prefill, a unit per ``prefill`` call: the vision tower on one image, then the prompt's
  embedding and the decoder over ``prefill_chunk`` prompt tokens at a time (past KV carried),
  with the M-RoPE positions of ``models.qwen.mrope_positions`` (ort-genai's own, checked by
  test). A newcomer's prefill holds the running decodes for one unit at most;
- decode steps run ``model.onnx`` over every running sequence at once: one KV buffer per layer
  with a row per sequence and room for ``max_length``, bound as both past and present
  (IOBinding), so GroupQueryAttention writes each row's new entry in place instead of copying
  the cache each step; a sequence keeps its row while it runs (a newcomer's cache is copied in
  once, a leaver's row takes the last row's: the other rows are not copied); ``attention_mask`` ones over each row's own length (GroupQueryAttention reads each
  row's length from it), each row's own M-RoPE position (the prompt's last + 1, all three axes).
The rule, the stop ids and the budget are per sequence. A sequence alone gives ``generate``'s
tokens and states within 1e-4 (fp32; the prompt's attention is computed in chunks, not in one
call); in a batch, the same tokens and states within 1e-4 of alone.

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
class Prompt:
    """What a sequence's prefill still has to run (see ``_Stepping.prefill``)."""

    positions: np.ndarray  # (3, L) M-RoPE of the prompt (its ids: the sequence's ``seen``)
    images: list[tuple[np.ndarray, np.ndarray]]  # not yet encoded: (pixel rows, grid (1, 3))
    features: list[np.ndarray] = field(default_factory=list)  # encoded, in prompt order
    embeds: np.ndarray | None = None  # (1, L, H) once every image is encoded
    done: int = 0  # prompt tokens through the decoder


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
    prefill_ms: float = 0.0  # compute time of its prefill units
    prompt: Prompt | None = None  # while its prefill runs
    started: float = field(default_factory=time.perf_counter)  # decoding's start
    tokens: list[int] = field(default_factory=list)
    states: list[np.ndarray] = field(default_factory=list)
    stopped: bool = False
    done: bool = False

    @property
    def ready(self) -> bool:
        """Its prefill has run: it decodes at the next ``step``."""
        return self.prompt is None


@dataclass(eq=False)
class _Rows:
    """The decode batch's KV buffers, one per layer's key and value (rows, kv_heads, capacity,
    head); row ``i`` holds ``seqs[i]``'s cache, the rows past ``len(seqs)`` are free."""

    arrays: list[np.ndarray]
    seqs: list[Sequence]


def _session_options(threads: int | None) -> Any:
    import onnxruntime as ort  # heavy: onnxruntime, loaded with a session

    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    # idle intra-op threads sleep, as the engines' sessions (backends/ort.py says why)
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return options


class _Stepping:
    """``begin``/``prefill``/``step``/``finish``: chunked prefill and batched decode steps over
    concurrent sequences (mixed into :class:`OrtGenaiMllm`; the module docstring says how)."""

    def _sessions(self: Any) -> None:
        import onnxruntime as ort  # heavy: onnxruntime, loaded with a session

        if self._decoder is None:
            options = _session_options(self.threads)
            self._vision = ort.InferenceSession(str(self.model_dir / "vision.onnx"), options)
            self._embed = ort.InferenceSession(str(self.model_dir / "embedding.onnx"), options)
            decoder = ort.InferenceSession(str(self.model_dir / "model.onnx"), options)
            self._decoder = decoder
            self._layers = sum(i.name.endswith(".key") for i in decoder.get_inputs())
            past = next(i for i in decoder.get_inputs() if i.name.endswith(".key"))
            self._kv_shape = (past.shape[1], self.genai_config()["decoder"]["head_size"])

    def begin(
        self: Any,
        messages: list[dict[str, Any]],
        images: list[Image.Image],
        on_text: OnText | None = None,
    ) -> Sequence:
        """A request's sequence, its prompt processed (template, tokens, pixels) and nothing
        run yet: ``prefill`` runs it a unit at a time, then it joins the batch at ``step``."""
        self._sessions()
        inputs = self.prompt_inputs(messages, images)
        seen = np.asarray(inputs["input_ids"][0], dtype=np.int64)
        prompt = len(seen)
        budget = max(0, min(self.max_new_tokens, self.max_length - prompt))
        grids = None
        if "image_grid_thw" in inputs:
            grids = np.asarray(inputs["image_grid_thw"], np.int64)
        parts: list[tuple[np.ndarray, np.ndarray]] = []
        if grids is not None:
            pixels = np.asarray(inputs["pixel_values"], np.float32)
            offsets = np.concatenate([[0], np.cumsum(grids.prod(-1))])
            parts = [(pixels[offsets[i] : offsets[i + 1]], grids[i : i + 1])
                     for i in range(len(grids))]  # fmt: skip
        merge = int(self.genai_config()["vision"].get("spatial_merge_size", 2))
        positions = qwen.mrope_positions(seen, grids, merge)
        heads, head = self._kv_shape
        empty = np.zeros((1, heads, 0, head), np.float32)
        seq = Sequence(seen, prompt, budget, int(positions.max()) + 1, np.zeros(0, np.float32),
                       [empty] * (2 * self._layers), 0,
                       tokenizer_stream(self.processor.tokenizer, on_text),
                       prompt=Prompt(positions, parts))  # fmt: skip
        return seq

    def prefill(self: Any, seq: Sequence) -> bool:
        """Run one unit of ``seq``'s prefill (one image through the vision tower, or the decoder
        over up to ``prefill_chunk`` prompt tokens); True once it is ready to decode."""
        work = seq.prompt
        if work is None:
            return True
        t0 = time.perf_counter()
        if work.images:
            pixels, grid = work.images.pop(0)
            feeds = {"pixel_values": pixels, "image_grid_thw": grid}
            work.features.append(self._vision.run(None, feeds)[0])
        else:
            if work.embeds is None:
                features = (np.concatenate(work.features) if work.features
                            else np.zeros((0, self.hidden_size()), np.float32))  # fmt: skip
                feeds = {"input_ids": seq.seen[None], "image_features": features}
                work.embeds = self._embed.run(None, feeds)[0]
                work.features = []
            stop = min(work.done + self.prefill_chunk, seq.prompt_tokens)
            logits, present = self._chunk(seq.kv, work.embeds[:, work.done : stop],
                                          work.positions[:, work.done : stop], stop)  # fmt: skip
            seq.kv, seq.length, work.done = present, stop, stop
            if stop == seq.prompt_tokens:
                seq.logits, seq.prompt = logits[0, -1], None
                seq.done = seq.budget == 0
        seq.prefill_ms += (time.perf_counter() - t0) * 1e3
        if seq.prompt is None:
            seq.started = time.perf_counter()
        return seq.prompt is None

    def _chunk(self: Any, kv: list[np.ndarray], embeds: np.ndarray, positions: np.ndarray,
               total: int) -> tuple[np.ndarray, list[np.ndarray]]:  # fmt: skip
        """The decoder over one chunk of a prompt: (logits of its last token, present KV)."""
        feeds = {
            "inputs_embeds": np.ascontiguousarray(embeds),
            "attention_mask": np.ones((1, total), np.int64),
            "position_ids": np.ascontiguousarray(positions[:, None, :]),
        }
        for i in range(self._layers):
            feeds[f"past_key_values.{i}.key"] = kv[2 * i]
            feeds[f"past_key_values.{i}.value"] = kv[2 * i + 1]
        names = ["logits"] + [f"present.{i}.{k}" for i in range(self._layers)
                              for k in ("key", "value")]  # fmt: skip
        logits, *present = self._decoder.run(names, feeds)
        return logits, present

    def open(
        self: Any,
        messages: list[dict[str, Any]],
        images: list[Image.Image],
        on_text: OnText | None = None,
    ) -> Sequence:
        """``begin`` and the whole prefill: the sequence joins the batch at the next ``step``."""
        seq = self.begin(messages, images, on_text)
        while not self.prefill(seq):
            pass
        return seq

    def step(self: Any, seqs: list[Sequence]) -> None:
        """One token for every running sequence in ``seqs``: choose it (each by its own rule),
        then feed the chosen tokens through the decoder in one batch for their states."""
        live = [s for s in seqs if not s.done]
        assert all(s.ready for s in live), "a sequence whose prefill has not run cannot step"
        if not live:
            return
        import onnxruntime as ort  # heavy: onnxruntime, loaded with a session

        kv, live = self._batch_kv(live)  # ``live`` in the order of the buffers' rows
        chosen = []
        for seq in live:
            token = qwen.next_token(seq.logits, seq.seen, self.repetition_penalty)
            seq.tokens.append(token)
            seq.seen = np.append(seq.seen, token)
            if seq.stream is not None:
                seq.stream.push(token)
            chosen.append(token)
        width = max(s.length for s in live) + 1  # KV slots after this step
        mask = np.zeros((len(live), width), np.int64)
        for row, seq in enumerate(live):
            mask[row, : seq.length + 1] = 1
        ids = np.array(chosen, np.int64)[:, None]  # (B, 1)
        no_image = np.zeros((0, self.hidden_size()), np.float32)
        embeds = self._embed.run(None, {"input_ids": ids, "image_features": no_image})[0]
        positions = np.repeat(np.array([[s.position] for s in live], np.int64)[None], 3, 0)
        io = self._decoder.io_binding()
        io.bind_output("logits")
        io.bind_output("hidden_states")
        io.bind_cpu_input("inputs_embeds", embeds)
        io.bind_cpu_input("attention_mask", mask)
        io.bind_cpu_input("position_ids", positions)
        for i in range(self._layers):  # past and present share one buffer: written in place
            for j, kind in enumerate(("key", "value")):
                buffer = ort.OrtValue.ortvalue_from_numpy(kv[2 * i + j])  # the same memory
                io.bind_ortvalue_input(f"past_key_values.{i}.{kind}", buffer)
                io.bind_ortvalue_output(f"present.{i}.{kind}", buffer)
        self._decoder.run_with_iobinding(io)
        logits, hidden = (v.numpy() for v in io.get_outputs()[:2])
        for row, seq in enumerate(live):
            seq.logits = np.array(logits[row, -1], np.float32)
            seq.states.append(np.array(hidden[row, -1], np.float32))
            seq.length += 1
            seq.position += 1
            if chosen[row] in self.stop_ids:
                seq.stopped = seq.done = True
            elif len(seq.tokens) >= seq.budget:
                seq.done = True

    def _batch_kv(self: Any, live: list[Sequence]) -> tuple[list[np.ndarray], list[Sequence]]:
        """The batch's KV per layer, (B, kv_heads, capacity, head) views of the first B rows of
        buffers that outlive the batch, past and present of every step (GroupQueryAttention
        writes each row's new entry at its own length: no copy of the cache per step), and the
        sequences in row order. A sequence keeps its row while it runs: a newcomer's KV is
        copied into the next free row once; a leaver's row is filled by the last row (one row
        copied, the others untouched). Rows beyond a row's own length are never read."""
        wanted = {id(s) for s in live}
        for seq in [s for s in self._rows.seqs if id(s) not in wanted] if self._rows else []:
            self._evict(seq)  # stepped no more (done, or left out): its row is free
        rows = self._rows
        joining = [s for s in live if s.kv is not None]
        count = (len(rows.seqs) if rows else 0) + len(joining)
        capacity = max(s.length + s.budget - len(s.tokens) + 1 for s in live)
        if rows is None or rows.arrays[0].shape[0] < count or rows.arrays[0].shape[2] < capacity:
            rows = self._rows = self._grow(count, capacity)
        for seq in joining:  # each newcomer's own KV (1, kv_heads, length, head) into its row
            row = len(rows.seqs)
            for array, part in zip(rows.arrays, seq.kv, strict=True):
                array[row, :, : seq.length] = part[0]
            rows.seqs.append(seq)
            seq.kv = None  # held by the batch from now on
        return [a[: len(rows.seqs)] for a in rows.arrays], list(rows.seqs)

    def _grow(self: Any, count: int, capacity: int) -> _Rows:
        """Buffers for at least ``count`` rows of ``capacity`` entries (4 rows at first, then
        twice the rows, and the whole ``max_length``, reserved: zeroed memory the OS maps only
        where it is written)."""
        old = self._rows
        rows = max(count, 2 * old.arrays[0].shape[0] if old else 4)
        capacity = max(capacity, self.max_length + 1, old.arrays[0].shape[2] if old else 0)
        heads, head = self._kv_shape
        arrays = [np.zeros((rows, heads, capacity, head), np.float32)
                  for _ in range(2 * self._layers)]  # fmt: skip
        for r, seq in enumerate(old.seqs if old else []):
            for new, array in zip(arrays, old.arrays, strict=True):
                new[r, :, : seq.length] = array[r, :, : seq.length]
        return _Rows(arrays, list(old.seqs) if old else [])

    def _evict(self: Any, seq: Sequence) -> None:
        """``seq``'s row leaves the buffers (the last row moves into it); a sequence that may
        still step gets its own copy of its KV back first. The buffers stay when the last row goes:
        the next batch writes into memory already mapped (on this VM, writing a 4-row 3B cache
        into fresh pages took 0.8 s, into pages touched before 40 ms)."""
        rows = self._rows
        row = next(i for i, s in enumerate(rows.seqs) if s is seq)
        if not seq.done:
            seq.kv = [a[row : row + 1, :, : seq.length].copy() for a in rows.arrays]
        last = rows.seqs.pop()
        if last is not seq:
            for array in rows.arrays:
                array[row, :, : last.length] = array[len(rows.seqs), :, : last.length]
            rows.seqs[row] = last

    def release(self: Any, seq: Sequence) -> None:
        """``seq`` leaves the batch (finished or cancelled): its row goes, the others' stay."""
        seq.done = True
        if self._rows is not None and any(s is seq for s in self._rows.seqs):
            self._evict(seq)
        seq.kv = None

    def finish(self: Any, seq: Sequence) -> Generation:
        """The sequence's generation (its stream finished); call once it is ``done``."""
        tokenizer = self.processor.tokenizer
        text = tokenizer.decode(seq.tokens, skip_special_tokens=True)
        if seq.stream is not None:
            seq.stream.finish(text)
        empty = np.zeros((0, self.hidden_size()), np.float32)
        hidden = np.stack(seq.states) if seq.states else empty
        decode_ms = (time.perf_counter() - seq.started) * 1e3  # since its prefill ended
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
        prefill_chunk: int = 256,
    ) -> None:
        self.model_dir = Path(model_dir)
        if not (self.model_dir / "genai_config.json").exists():
            raise RequestError(
                "--engines",
                f"{self.model_dir} has no genai_config.json; export the MLLM with "
                "`conceptseg export --weights DIR --out ENGINES --parts mllm`",
            )
        if prefill_chunk < 1:
            raise RequestError("prefill_chunk", f"{prefill_chunk} must be >= 1 (prompt tokens)")
        self.threads = threads
        self.prefill_chunk = prefill_chunk
        self._model: Any = None  # ort-genai's Model, for ``generate``/``decode`` only
        self._decoder: Any = None  # our sessions (``begin``/``step``), made at the first ``begin``
        self._vision: Any = None
        self._embed: Any = None
        self._rows: _Rows | None = None  # the decode batch's KV buffers
        self.processor = qwen.load_processor(self.model_dir.parent / "processor")
        rule = qwen.stop_rule(self.model_dir.parent / "processor")
        self.stop_ids, self.repetition_penalty = set(rule.stop_ids), rule.repetition_penalty
        self.max_new_tokens = max_new_tokens
        self.max_length = max_length

    @property
    def model(self) -> Any:
        """ort-genai's ``Model`` (vision, embedding, decoder), loaded at first use: the serving
        path (``begin``/``step``) runs its own sessions and never loads it."""
        if self._model is None:
            import onnxruntime_genai as og  # optional: the ort-genai extra

            config = og.Config(str(self.model_dir))
            config.clear_providers()  # CPU
            if self.threads:
                options = {"intra_op_num_threads": self.threads, "inter_op_num_threads": 1}
                sections = ("decoder", "embedding", "vision")
                config.overlay(
                    json.dumps({"model": {s: {"session_options": options} for s in sections}})
                )
            self._model = og.Model(config)
        return self._model

    def genai_config(self) -> dict[str, Any]:
        """``genai_config.json``'s ``model`` section (the graphs' shapes and ids)."""
        if not hasattr(self, "_genai_config"):
            config = json.loads((self.model_dir / "genai_config.json").read_text())
            self._genai_config: dict[str, Any] = config["model"]
        return self._genai_config

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
        return int(self.genai_config()["decoder"]["hidden_size"])
