"""The MLLM on TensorRT-LLM (``--mllm-backend trtllm``), GPU machines only.

TensorRT-LLM runs Qwen2.5-VL on its PyTorch backend (LLM API) only; quantized checkpoints come
from ``conceptseg_export.trtllm_quantize`` (ModelOpt fp8 / int4_awq / w4a8_awq, KV cache left
unquantized). The API this file relies on changed between releases: it is written for
``TRTLLM_PIN`` (``gpu_stack.toml``) and refuses other versions. It runs in the deployment
image (``docker/Dockerfile``): the NGC release's torch, transformers and numpy, this package
installed over them with those as constraints (``tests/gpu_stack`` checks it on Python 3.12).

What the CTM gets, and how. The CTM reads, for every generated token t_1..t_n (the stop token
t_n included), the final-norm state at the position where t_j is the *input* (``Generation``).
- :func:`register_model_class` registers :class:`ConceptSegQwen2_5_VL` (TensorRT-LLM's
  Qwen2.5-VL with a forward hook on the text model's final norm) under the published checkpoint
  architecture ``ConceptSegR1ForConditionalGeneration_qwen2p5``. Its forward returns
  ``{"logits", "hidden_states"}``, the states selected like the logits (one row per context
  request: its last position; one per generation request).
- TensorRT-LLM then returns, per decoding iteration, the row of the position fed in that
  iteration: ``raw[0]`` = last prompt position (the state whose logits chose t_1), ``raw[j]`` =
  position of t_j for j >= 1. It never feeds the final token back, so ``raw[n]`` would not exist.
- So the stop decision is ours: TensorRT-LLM's end id is the sentinel, and
  :class:`HfDecisionRule` (a logits processor) applies the hf rule (penalty over prompt +
  completion, vision tokens suppressed, greedy) and, once t_n is a stop id or the budget is
  reached, forces ``SENTINEL`` (``<|vision_pad|>``, never chosen otherwise: it is suppressed),
  the request's only stop id. So t_n is fed back once, as in the hf backend, and
  ``hidden = raw[1 : n + 1]``, tokens = outputs without the sentinel (:func:`ctm_states`).
  ``tests/gpu/test_trtllm.py`` proves the mapping on the hf side (CPU) and on the GPU.
Prefix reuse: KV cache block reuse is on (``KvCacheConfig(enable_block_reuse=True)``), so
requests sharing the references reuse the blocks of the shared prefix (the mosaic included).
Image placeholders are the same token ids whatever the image: block reuse is only correct
because TensorRT-LLM keys multimodal blocks by image content too; the GPU test checks that
another mosaic is not served from the first one's blocks.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from conceptseg import gpu_stack
from conceptseg.models import qwen
from conceptseg.models.qwen_torch import rule_logits
from conceptseg.protocols import Generation
from conceptseg.textstream import OnText, TextStream, tokenizer_stream
from conceptseg.types import RequestError

TRTLLM_PIN = gpu_stack.load()["tensorrt_llm"]  # the deployment container's (gpu_stack.toml)
MODEL_TYPE = "qwen2_5_vl"  # the checkpoints' config model_type: TensorRT-LLM's stock Qwen2.5-VL
SINGLE_PROCESS = "TLLM_WORKER_USE_SINGLE_PROCESS"
ARCHITECTURE = "ConceptSegR1ForConditionalGeneration_qwen2p5"  # published checkpoints' name
HIDDEN = "hidden_states"  # the additional output's name
SENTINEL = qwen.VISION_PAD_ID  # <|vision_pad|>: suppressed by the rule, so only ever forced
log = logging.getLogger(__name__)


class HfDecisionRule:
    """TensorRT-LLM logits processor (PyTorch backend signature) with the hf backend's rule.

    Per request: ``prompt_ids`` as transformers' processor made them (TensorRT-LLM's own copy
    carries out-of-vocabulary ids at the image placeholders, so only its completion part is
    read), the stop ids, the repetition penalty and the token budget. Greedy sampling
    (``top_k=1``) then picks the argmax of the processed logits.
    """

    def __init__(
        self, prompt_ids: list[int], stop_ids: set[int], penalty: float, budget: int
    ) -> None:
        self.prompt_ids = list(prompt_ids)
        self.stop_ids = set(stop_ids)
        self.penalty = penalty
        self.budget = budget

    def completion(self, token_ids: list[int]) -> list[int]:
        """The generated part of TensorRT-LLM's token list (prompt + completion)."""
        assert len(token_ids) >= len(self.prompt_ids), (
            f"expected prompt + completion ({len(token_ids)} < {len(self.prompt_ids)} prompt ids)"
        )
        return list(token_ids[len(self.prompt_ids) :])

    def __call__(
        self,
        req_id: int,
        logits: torch.Tensor,
        token_ids: list[list[int]],
        stream_ptr: int | None,
        client_id: int | None,
    ) -> None:
        del req_id, stream_ptr, client_id
        rows = logits.view(-1, logits.shape[-1])  # (beams = 1, V), modified in place
        done = self.completion(token_ids[0])
        if done and (done[-1] in self.stop_ids or len(done) >= self.budget):
            rows.fill_(-torch.inf)  # t_n has been chosen: its own step runs now; then stop
            rows[:, SENTINEL] = 0.0
            return
        seen = torch.tensor([self.prompt_ids + done], device=rows.device)
        rows.copy_(rule_logits(rows, seen, self.penalty).to(rows.dtype))


def ctm_states(
    output_ids: list[int], raw: np.ndarray, stop_ids: set[int]
) -> tuple[list[int], np.ndarray, bool]:
    """``(tokens, hidden, stopped)`` from TensorRT-LLM's output ids and raw per-iteration states.

    ``output_ids`` = t_1..t_n (+ ``SENTINEL`` when the rule forced it); ``raw`` (iterations, H)
    with ``raw[0]`` = last prompt position and ``raw[j]`` = position of t_j. Returns
    ``hidden[j - 1] = raw[j]`` for j = 1..n: the state of t_j as input, as the hf backend.
    """
    tokens = list(output_ids)
    if tokens and tokens[-1] == SENTINEL:
        tokens.pop()
    n = len(tokens)
    assert raw.shape[0] >= n + 1, (
        f"{raw.shape[0]} states for {n} tokens: the last token's own step is missing "
        "(was the sentinel forced? is the overlap scheduler off?)"
    )
    return tokens, raw[1 : n + 1].astype(np.float32), bool(tokens) and tokens[-1] in stop_ids


def _version_check() -> Any:
    import tensorrt_llm  # optional: TensorRT-LLM, GPU container only

    if tensorrt_llm.__version__ != TRTLLM_PIN:
        raise RequestError(
            "--mllm-backend trtllm",
            f"TensorRT-LLM {tensorrt_llm.__version__} is installed; this backend is written for "
            f"{TRTLLM_PIN} (the additional-outputs API differs between releases). Use the NGC "
            f"TensorRT-LLM {TRTLLM_PIN} container.",
        )
    return tensorrt_llm


_REGISTERED: list[type] = []  # the registered class, once registered (this process)


def register_model_class() -> type:
    """Register ``ConceptSegQwen2_5_VL`` under ``ARCHITECTURE`` (idempotent)."""
    if _REGISTERED:
        return _REGISTERED[0]
    _version_check()
    from tensorrt_llm._torch.models import (
        modeling_qwen2vl as trt_qwen,  # optional: TensorRT-LLM, GPU container only
    )
    from tensorrt_llm._torch.models.modeling_utils import (
        register_auto_model,  # optional: TensorRT-LLM, GPU container only
    )
    from tensorrt_llm.inputs import (  # optional: TensorRT-LLM, GPU container only
        MultimodalPlaceholderMetadata,
        MultimodalPlaceholderPlacement,
        register_input_processor,
    )

    class ConceptSegQwen2_5_VL(trt_qwen.Qwen2_5_VLModel):  # noqa: N801 (TensorRT-LLM's naming)
        """Qwen2.5-VL whose forward also returns the final-norm states (selected as the logits)."""

        def __init__(self, model_config: Any, *args: Any, **kwargs: Any) -> None:
            super().__init__(model_config, *args, **kwargs)
            self._final_norm: torch.Tensor | None = None
            self.llm.model.norm.register_forward_hook(self._keep_final_norm)

        def _keep_final_norm(self, module: Any, args: Any, output: Any) -> None:
            # TensorRT-LLM's fused RMSNorm returns (normed, residual) when given a residual
            self._final_norm = output[0] if isinstance(output, tuple) else output

        def forward(self, attn_metadata: Any, input_ids: Any = None, position_ids: Any = None,
                    input_embeds: Any = None, return_context_logits: bool = False,
                    **kwargs: Any) -> dict[str, torch.Tensor]:  # fmt: skip
            logits = super().forward(attn_metadata, input_ids, position_ids, input_embeds,
                                     return_context_logits, **kwargs)  # fmt: skip
            hidden = self._final_norm  # (tokens in the batch, H)
            assert hidden is not None, "the final norm did not run"
            if not return_context_logits:  # the logits' selection: each sequence's last token
                last = torch.cumsum(attn_metadata.seq_lens_cuda, dim=0, dtype=torch.long) - 1
                hidden = hidden[last]
            return {"logits": logits, HIDDEN: hidden}

    placeholders = _stock_placeholders(MODEL_TYPE) or MultimodalPlaceholderMetadata(
        placeholder_map={"image": "<|vision_start|><|image_pad|><|vision_end|>",
                         "video": "<|vision_start|><|video_pad|><|vision_end|>"},
        placeholder_placement=MultimodalPlaceholderPlacement.BEFORE_TEXT,
    )  # fmt: skip
    # register_input_processor sets the placeholder metadata of MODEL_TYPE process-wide (a plain
    # dict assignment): passing the stock entry back keeps TensorRT-LLM's own Qwen2.5-VL as it is
    cls = register_input_processor(trt_qwen.Qwen2VLInputProcessorBase, model_type=MODEL_TYPE,
                                   placeholder_metadata=placeholders)(ConceptSegQwen2_5_VL)  # fmt: skip
    cls = register_auto_model(ARCHITECTURE)(cls)
    if hasattr(trt_qwen, "register_vision_encoder"):  # as TensorRT-LLM registers Qwen2_5_VLModel
        # older releases choose the vision class by SM in QWEN2_5_VL_VISION_MODEL_CLASS; newer
        # ones dropped the constant and register Qwen2_5_VisionModel
        vision = getattr(trt_qwen, "QWEN2_5_VL_VISION_MODEL_CLASS", None) or trt_qwen.Qwen2_5_VisionModel
        cls = trt_qwen.register_vision_encoder(trt_qwen.Qwen2VisionModelBase, vlm_base_model=vision)(cls)
    _REGISTERED.append(cls)
    return cls


def _stock_placeholders(model_type: str) -> Any:
    """TensorRT-LLM's registered placeholder metadata for ``model_type``, or None."""
    from tensorrt_llm import inputs  # optional: TensorRT-LLM, GPU container only

    registry = getattr(inputs, "MULTIMODAL_PLACEHOLDER_REGISTRY", None)
    if registry is None or not registry.is_valid(model_type):
        return None
    return registry.get_placeholder_metadata(model_type)


def single_process_worker(environ: dict[str, str] | Any = os.environ) -> None:
    """In-process executor: a spawned worker would not see :func:`register_model_class`'s
    registration, so any other value (e.g. an inherited ``0``) is overridden, loudly."""
    if environ.get(SINGLE_PROCESS, "1") != "1":
        log.warning("%s=%s overridden to 1: the out-of-tree model class registers in this "
                    "process only", SINGLE_PROCESS, environ[SINGLE_PROCESS])  # fmt: skip
    environ[SINGLE_PROCESS] = "1"


class TrtllmMllm:
    """``generate(messages, images) -> Generation`` on TensorRT-LLM's LLM API (one GPU)."""

    def __init__(
        self,
        checkpoint: Path,
        *,
        max_new_tokens: int = 768,
        max_length: int = 2816,
        block_reuse: bool = True,
        kv_fraction: float = 0.5,
        max_batch_size: int = 8,
    ) -> None:
        # Out-of-tree model classes register in-process; one GPU needs no worker processes.
        single_process_worker()
        register_model_class()
        from tensorrt_llm import LLM  # optional: TensorRT-LLM, GPU container only
        from tensorrt_llm.llmapi import KvCacheConfig  # optional: TensorRT-LLM, GPU container only

        self.checkpoint = Path(checkpoint)
        self.processor = qwen.load_processor(self.checkpoint)
        rule = qwen.stop_rule(self.checkpoint)
        self.stop_ids, self.repetition_penalty = set(rule.stop_ids), rule.repetition_penalty
        self.max_new_tokens, self.max_length = max_new_tokens, max_length
        config = json.loads((self.checkpoint / "config.json").read_text())
        self.hidden_size = int(config.get("text_config", config)["hidden_size"])
        self.llm = LLM(
            model=str(self.checkpoint),
            max_seq_len=max_length + 1,  # the stop token's own step
            max_batch_size=max_batch_size,
            kv_cache_config=KvCacheConfig(
                enable_block_reuse=block_reuse, free_gpu_memory_fraction=kv_fraction
            ),
            # the rule reads the tokens chosen so far: sampling must not run a step behind
            disable_overlap_scheduler=True,
        )

    def close(self) -> None:
        """Free the GPU memory (the LLM API's executor) now rather than at exit."""
        self.llm.shutdown()

    def _sampling(self, prompt_ids: list[int], budget: int) -> Any:
        from tensorrt_llm import SamplingParams  # optional: TensorRT-LLM, GPU container only

        outputs: Any = [HIDDEN]
        try:  # releases before the string form took AdditionalModelOutput(name, gather_context)
            from tensorrt_llm.sampling_params import (
                AdditionalModelOutput,  # optional: TensorRT-LLM, GPU container only
            )

            outputs = [AdditionalModelOutput(name=HIDDEN, gather_context=False)]
        except ImportError:
            pass
        return SamplingParams(
            max_tokens=budget + 1,  # + the forced sentinel
            top_k=1,
            end_id=SENTINEL,  # stop ids are the rule's: TensorRT-LLM stops at the sentinel only
            stop_token_ids=[SENTINEL],
            logits_processor=HfDecisionRule(
                prompt_ids, self.stop_ids, self.repetition_penalty, budget
            ),
            additional_model_outputs=outputs,
            detokenize=False,
        )

    def generate(
        self,
        messages: list[dict[str, Any]],
        images: list[Image.Image],
        on_text: OnText | None = None,
    ) -> Generation:
        """Greedy completion; ``on_text`` receives the text in deltas while decoding. Thread
        safe: the ``mllm`` model's scheduler calls it from one thread per slot, and each call is
        one ``LLM.generate_async`` request, so TensorRT-LLM batches them in flight (each with its
        own logits processor and hidden-state output; KV block reuse stays on)."""
        text = qwen.chat_text(self.processor, messages)
        prompt_ids = qwen.chat_inputs(self.processor, messages, images)["input_ids"][0]
        prompt_ids = [int(i) for i in prompt_ids]
        budget = max(0, min(self.max_new_tokens, self.max_length - len(prompt_ids)))
        if budget == 0:
            return Generation(
                "", [], np.zeros((0, self.hidden_size), np.float32), len(prompt_ids), False
            )
        t0 = time.perf_counter()
        request = {"prompt": text, "multi_modal_data": {"image": list(images)}}
        stream = tokenizer_stream(self.processor.tokenizer, on_text)
        result = self._complete(request, self._sampling(prompt_ids, budget), stream)
        total_ms = (time.perf_counter() - t0) * 1e3
        if len(result.prompt_token_ids) != len(prompt_ids):
            raise RuntimeError(
                f"TensorRT-LLM's prompt has {len(result.prompt_token_ids)} tokens, transformers' "
                f"{len(prompt_ids)}: the processors disagree (chat template or image resize)"
            )
        sequence = result.outputs[0]
        raw = sequence.additional_generation_outputs[HIDDEN]  # list of (1, beams, H) or a tensor
        raw = torch.cat([r.reshape(-1, r.shape[-1]) for r in raw]) if isinstance(raw, list) else raw
        tokens, hidden, stopped = ctm_states(
            list(sequence.token_ids),
            raw.reshape(-1, raw.shape[-1]).float().cpu().numpy(),
            self.stop_ids,
        )
        text_out = self.processor.tokenizer.decode(tokens, skip_special_tokens=True)
        if stream is not None:
            stream.finish(text_out)
        # the LLM API reports no prefill/decode split here: the total goes to decode_ms
        return Generation(text_out, tokens, hidden, len(prompt_ids), stopped, 0.0, total_ms)

    def _complete(self, request: dict[str, Any], sampling: Any, stream: TextStream | None) -> Any:
        """One ``generate_async`` request to the end; streaming into ``stream`` (the sentinel
        skipped) when there is one. An exception from its callback (the scheduler's
        ``Cancelled``) aborts the request, so TensorRT-LLM frees its slot and KV blocks."""
        future = self.llm.generate_async(request, sampling, streaming=stream is not None)
        if stream is None:
            return future.result()
        fed = 0
        try:
            for partial in future:  # one RequestOutput per iteration, token_ids so far
                ids = list(partial.outputs[0].token_ids)
                for token in ids[fed:]:
                    if token != SENTINEL:
                        stream.push(int(token))
                fed = len(ids)
        except BaseException:
            future.abort()
            raise
        return future.result()


def trtllm_mllm(
    checkpoint: Path, *, max_new_tokens: int = 768, max_length: int = 2816
) -> TrtllmMllm:
    """The TensorRT-LLM MLLM backend on a (ModelOpt-quantized or bf16) checkpoint directory."""
    if not torch.cuda.is_available():
        raise RequestError("--mllm-backend trtllm", "needs an NVIDIA GPU; use ort-genai or hf here")
    return TrtllmMllm(Path(checkpoint), max_new_tokens=max_new_tokens, max_length=max_length)
