"""A stand-in for TensorRT-LLM, as the container's release spells the API the glue uses.

Only what ``conceptseg.backends.trtllm_mllm`` touches: the version, ``LLM`` (generate on a
script: the completion is ``$FAKE_TRTLLM_SCRIPT`` tokenized, then a stop id, then the sentinel),
``SamplingParams``, the model and input-processor registries. Shapes follow the real API:
``additional_generation_outputs[name]`` is a list of (1, beams, H) tensors, one per iteration.
"""

from __future__ import annotations

import os
from types import SimpleNamespace

import numpy as np
import torch  # the fake (tests/gpu_stack/fakes/torch): the container has the real one

from conceptseg import gpu_stack
from tensorrt_llm._torch.models.modeling_utils import MODEL_CLASS_MAPPING

__version__ = gpu_stack.load()["tensorrt_llm"]


class SamplingParams:
    def __init__(self, **kwargs):
        self.__dict__.update(kwargs)


class LLM:
    """Checks what the glue must have done before ``LLM(...)``, then answers from the script."""

    def __init__(self, model: str, **kwargs):
        from transformers import AutoConfig

        from conceptseg.models import qwen

        if os.environ.get("TLLM_WORKER_USE_SINGLE_PROCESS") != "1":
            raise RuntimeError("a spawned MPI worker would not see the out-of-tree registration")
        architecture = AutoConfig.from_pretrained(model).architectures[0]
        if architecture not in MODEL_CLASS_MAPPING:
            raise ValueError(f"Unknown architecture {architecture!r}: not registered")
        self.model, self.kwargs = model, kwargs
        self.processor = qwen.load_processor(model)  # as TRT-LLM's input processor: HF's
        self.hidden = int(AutoConfig.from_pretrained(model).text_config.hidden_size)

    def generate(self, request, sampling, use_tqdm=True):
        assert sampling.end_id == sampling.stop_token_ids[0], "the sentinel is the only stop id"
        prompt = self.processor(text=[request["prompt"]], images=request["multi_modal_data"]["image"],
                                return_tensors="np")["input_ids"][0]  # fmt: skip
        script = os.environ.get("FAKE_TRTLLM_SCRIPT", "<answer>mug</answer>")
        tokens = self.processor.tokenizer(script, add_special_tokens=False)["input_ids"]
        stop = min(sampling.logits_processor.stop_ids)
        completion = [*tokens, stop, sampling.end_id]  # t_1..t_n, then the forced sentinel
        rng = np.random.default_rng(0)
        states = [torch.tensor(rng.standard_normal((1, 1, self.hidden), np.float32))
                  for _ in range(len(completion))]  # fmt: skip  # raw[0..n]
        output = SimpleNamespace(token_ids=completion,
                                 additional_generation_outputs={sampling.additional_model_outputs[0].name: states})  # fmt: skip
        return [SimpleNamespace(prompt_token_ids=[int(i) for i in prompt], outputs=[output])]

    def generate_async(self, request, sampling, streaming=False):
        """A finished request (the LLM API's RequestOutput future): ``result()``, and iterating
        it gives one partial output per token when streaming."""
        return _Finished(self.generate(request, sampling)[0], streaming)

    def shutdown(self):
        pass


class _Finished:
    def __init__(self, output, streaming):
        self.output, self.streaming = output, streaming

    def result(self):
        return self.output

    def __iter__(self):
        ids = self.output.outputs[0].token_ids
        for n in range(1, len(ids) + 1) if self.streaming else ():
            yield SimpleNamespace(outputs=[SimpleNamespace(token_ids=ids[:n])])

    def abort(self):
        pass
