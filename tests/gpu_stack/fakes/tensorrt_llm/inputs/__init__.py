"""The multimodal registries: ``register_input_processor`` overwrites per ``model_type`` with a
plain dict assignment, as the release's ``tensorrt_llm/inputs/registry.py`` does."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum


class MultimodalPlaceholderPlacement(Enum):
    BEFORE_TEXT = 0
    AFTER_TEXT = 1


@dataclass
class MultimodalPlaceholderMetadata:
    placeholder_map: dict = field(default_factory=dict)
    placeholder_placement: MultimodalPlaceholderPlacement = MultimodalPlaceholderPlacement.AFTER_TEXT


class MultimodalPlaceholderRegistry:
    def __init__(self):
        self._multimodal_placeholder_by_model_type = {}

    def set_placeholder_metadata(self, model_type, placeholder_metadata):
        self._multimodal_placeholder_by_model_type[model_type] = placeholder_metadata

    def get_placeholder_metadata(self, model_type):
        return self._multimodal_placeholder_by_model_type[model_type]

    def is_valid(self, model_type):
        return model_type in self._multimodal_placeholder_by_model_type


MULTIMODAL_PLACEHOLDER_REGISTRY = MultimodalPlaceholderRegistry()
# the stock Qwen2.5-VL entry, registered when TensorRT-LLM imports its own model
STOCK_QWEN2_5_VL = MultimodalPlaceholderMetadata(
    {"image": "<|vision_start|><|image_pad|><|vision_end|>"},
    MultimodalPlaceholderPlacement.BEFORE_TEXT,
)
MULTIMODAL_PLACEHOLDER_REGISTRY.set_placeholder_metadata("qwen2_5_vl", STOCK_QWEN2_5_VL)
INPUT_PROCESSORS = {}


def register_input_processor(processor_cls, model_type, placeholder_metadata=None):
    if placeholder_metadata is None:
        raise ValueError("placeholder_metadata is required")

    def wrap(model_cls):
        INPUT_PROCESSORS[model_cls] = processor_cls
        MULTIMODAL_PLACEHOLDER_REGISTRY.set_placeholder_metadata(model_type, placeholder_metadata)
        return model_cls

    return wrap
