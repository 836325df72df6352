"""Qwen2.5-VL as the newer releases lay it out: ``Qwen2_5_VisionModel`` registered directly;
no ``QWEN2_5_VL_VISION_MODEL_CLASS`` (the older releases' constant)."""

VISION_ENCODERS = {}


class Qwen2VisionModelBase:
    pass


class Qwen2_5_VisionModel:  # noqa: N801
    pass


class Qwen2VLInputProcessorBase:
    pass


class Qwen2_5_VLModel:  # noqa: N801
    def __init__(self, model_config, *args, **kwargs):
        self.model_config = model_config


def register_vision_encoder(encoder_cls, vlm_base_model=None):
    def wrap(cls):
        VISION_ENCODERS[cls] = (encoder_cls, vlm_base_model)
        return cls

    return wrap
