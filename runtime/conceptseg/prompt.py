"""The reference chat prompt, byte for byte (METHOD.md section 3).

The text is the reference template's, odd spacing and the full-width comma included: the model
was trained on exactly these bytes, so nothing here is "tidied".
"""

from __future__ import annotations

from typing import Any

from PIL import Image

from conceptseg.mosaic import Mosaic, build_mosaic, resize_target
from conceptseg.types import Request

SYSTEM_PROMPT = "You are a helpful assistant. "

_TEMPLATE = (
    "\n"
    'Your task is to locate the object matching "{question}" in the Target Image.\n'
    "Data provided:\n"
    "1. Reference Image {ref_bboxes}.\n"
    "2. Target Image: The image to locate.\n"
    "Think through the reasoning process in your mind\uff0c induce the visual rule {check_prompt} "
    "in  the reference image, apply this rule to locate the corresponding object in the Target "
    "Image.\n"
    "Finally,  provide the bounding box  and a 1-2 word  noun phrase for the object in the target "
    "image. \n"
    "Output strictly in the following format: <think>[Your step-by-step analysis and reasoning]"
    "</think>  {check_answer} <bbox>[x3, y3, x4, y4]</bbox> <answer>concise noun phrase for "
    "target object</answer>\n"
    "     "
)

_RULE = "<rule>Visual rule of the reference targets</rule>"


def _slots(mosaic: Mosaic | None) -> dict[str, str]:
    if mosaic is None:  # no reference: ReasonSeg style, the target is the only image
        return {
            "ref_bboxes": ": N/A",
            "check_prompt": "",
            "check_answer": "<rule>Visual rule</rule>",
        }
    if mosaic.proxy_box is None:  # one reference filling the canvas: nothing to check
        return {"ref_bboxes": "", "check_prompt": "", "check_answer": _RULE}
    listed = [list(box) for box in mosaic.boxes[1:]]
    return {
        "ref_bboxes": f": Bounding boxes at {listed}",
        "check_prompt": "and check it by locating the missed bounding box in the top-left region",
        "check_answer": _RULE + "<check>[x1, y1, x2, y2]</check>",
    }


def user_text(question: str, mosaic: Mosaic | None) -> str:
    """The user turn's text for ``question`` and the reference mosaic (``None``: no reference)."""
    return _TEMPLATE.format(question=question, **_slots(mosaic))


def messages(question: str, mosaic: Mosaic | None) -> list[dict[str, Any]]:
    """Chat messages for the processor's chat template, images in the order [mosaic, target].

    Image entries carry no pixels: the caller passes ``images`` to the processor in the same order
    (``image_order``), which keeps this module free of model code.
    """
    images = [{"type": "image"}] * (1 if mosaic is None else 2)
    return [
        {"role": "system", "content": [{"type": "text", "text": SYSTEM_PROMPT}]},
        {
            "role": "user",
            "content": [*images, {"type": "text", "text": user_text(question, mosaic)}],
        },
    ]


def mllm_inputs(
    request: Request, question: str | None = None
) -> tuple[list[dict[str, Any]], list[Image.Image], Mosaic | None]:
    """What the MLLM gets for ``request``: the chat messages, the images in their order
    ``[mosaic, target]`` (``[target]`` without references), and the mosaic (None without
    references). ``question`` (default: the request's, stripped) is the text asked about."""
    mosaic = build_mosaic(request.references) if request.references else None
    text = request.question.strip() if question is None else question
    target = resize_target(request.image)
    images = [target] if mosaic is None else [mosaic.image, target]
    return messages(text, mosaic), images, mosaic
