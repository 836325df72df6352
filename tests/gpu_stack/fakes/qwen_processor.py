"""transformers' Qwen2.5-VL processor minus its video part, on the container's transformers.

transformers 4.57's ``Qwen2_5_VLProcessor`` insists on a video processor, which needs
torchvision; the container has it (with torch), this env has neither (see
test_container_env.py). The tokenizer, its chat template and the image processor are the real
ones of that transformers, loaded from the checkpoint; the ``<|image_pad|>`` expansion is the
processor's rule (grid t*h*w / merge_size**2 tokens per image).
"""

from __future__ import annotations

import numpy as np
from transformers import AutoImageProcessor, AutoTokenizer

IMAGE_PAD = "<|image_pad|>"


class ImagesOnlyProcessor:
    def __init__(self, directory):
        self.tokenizer = AutoTokenizer.from_pretrained(directory)
        self.image_processor = AutoImageProcessor.from_pretrained(directory)

    def apply_chat_template(self, messages, tokenize=False, add_generation_prompt=True):
        return self.tokenizer.apply_chat_template(
            messages, tokenize=tokenize, add_generation_prompt=add_generation_prompt
        )

    def __call__(self, text, images=(), return_tensors="np"):
        assert return_tensors == "np", "numpy only here"
        out = {}
        prompt = text[0]
        if images:
            out = dict(self.image_processor(images=list(images), return_tensors="np"))
            merge = self.image_processor.merge_size**2
            pieces = prompt.split(IMAGE_PAD)
            assert len(pieces) == len(images) + 1, "one <|image_pad|> per image"
            counts = [int(np.prod(g)) // merge for g in out["image_grid_thw"]]
            prompt = pieces[0] + "".join(IMAGE_PAD * n + p for n, p in zip(counts, pieces[1:], strict=True))
        out["input_ids"] = np.array([self.tokenizer(prompt)["input_ids"]])
        return out
