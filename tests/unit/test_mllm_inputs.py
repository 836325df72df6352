"""The ``mllm`` model re-checks what it is sent (clients can call it directly): chat messages of
text and image entries, one encoded PNG/JPEG per image entry, at most two, within the limits.

Run: .venv/bin/pytest tests/unit/test_mllm_inputs.py -q
"""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from PIL import Image

from conceptseg import prompt
from conceptseg.samples import sample_request
from conceptseg.serving.mllm import from_mllm_arrays, to_mllm_arrays
from conceptseg.types import RequestError


def _arrays(messages, blobs):
    return {"messages": np.array([json.dumps(messages).encode()], dtype=object),
            "images": np.array(blobs, dtype=object)}  # fmt: skip


def _gif() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buffer, format="GIF")
    return buffer.getvalue()


def test_the_orchestrators_own_request_round_trips():
    messages, images, _ = prompt.mllm_inputs(sample_request())
    back, decoded = from_mllm_arrays(to_mllm_arrays(messages, images))
    assert back == messages and [i.size for i in decoded] == [i.size for i in images]


USER = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "mug?"}]}]


@pytest.mark.parametrize(
    "arrays, field",
    [
        (_arrays(USER, [_gif()]), "images[0]"),  # GIF: not PNG or JPEG
        (_arrays(USER, []), "images"),  # an image entry without its image
        (_arrays(USER * 3, [b""] * 3), "images"),  # more than two images
        (_arrays({"role": "user"}, []), "messages"),  # not a list
        (_arrays([{"role": "tool", "content": []}], []), "messages[0]"),  # unknown role
        (_arrays([{"role": "user", "content": [{"type": "video"}]}], []), "messages[0]"),
        ({"messages": np.array([b"\xff{"], dtype=object), "images": np.array([], dtype=object)},
         "messages"),  # fmt: skip
    ],
)
def test_bad_mllm_requests_are_refused_by_field(arrays, field):
    with pytest.raises(RequestError) as info:
        from_mllm_arrays(arrays)
    assert info.value.field == field, info.value
