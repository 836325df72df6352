"""Properties of the pure core under arbitrary input (hypothesis): the tag parser, the router,
the mosaic, the options JSON and request validation never fail with anything but their
documented errors (RequestError naming a field; the router's ValueError on an empty question),
and prompt text never carries a special token into the tokenizer.

Run: .venv/bin/pytest tests/unit/test_fuzz.py -q   (seconds)
"""

from __future__ import annotations

import io
import json
import math

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from conceptseg import contract, mosaic, router, tags
from conceptseg.config import from_name
from conceptseg.contract import INPUTS, Options
from conceptseg.models import qwen
from conceptseg.types import Answer, Reference, RequestError

CONFIG = from_name("test", max_image_pixels=200_000, max_image_bytes=200_000)
# the fields a refusal may name: the inputs (and an unknown one sent, "extra"), options, parts
FIELDS = (*INPUTS, "extra", "options.", "ref_images[", "ref_boxes[", "references")
QUICK = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

TAG_TEXT = st.lists(
    st.sampled_from(
        [
            "<think>",
            "</think>",
            "<answer>",
            "</answer>",
            "<bbox>",
            "</bbox>",
            "<check>",
            "</check>",
            "<rule>",
            "</rule>",
            "[",
            "]",
            ",",
            "1",
            "-2.5",
            "1e309",
            "nan",
            " ",
            "mug",
            "\u200b",
            "<|im_end|>",
        ]
    )  # fmt: skip
    | st.text(max_size=8),
    max_size=40,
).map("".join)


def assert_named(exc: RequestError) -> None:
    assert exc.field.startswith(FIELDS), exc
    assert " at 0x" not in str(exc) and len(str(exc)) < 400, exc


@QUICK
@given(TAG_TEXT)
def test_tags_parse_never_raises_and_boxes_are_finite(text):
    answer = tags.parse(text)
    assert isinstance(answer, Answer)
    for box in (answer.bbox, answer.check):
        assert box is None or (len(box) == 4 and all(math.isfinite(v) for v in box))


@QUICK
@given(st.text(max_size=200))
def test_router_threshold_is_defined_for_every_nonempty_question(question):
    if not question.strip():
        with pytest.raises(ValueError):
            router.threshold(question)
        return
    t = router.threshold(question)
    assert t > 0 and router.needs_probe(t) == (t < 1)
    assert router.accepts(1.0, t) == (t <= 1.0 and t < 1)
    assert router.word_count(question, strip_parentheticals=False) >= router.word_count(question)


SIDES = st.integers(0, 64)
COORD = st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.integers(-100, 200))


@QUICK
@given(st.lists(st.tuples(SIDES, SIDES, st.tuples(COORD, COORD, COORD, COORD)), max_size=6))
def test_build_mosaic_takes_a_valid_reference_set_or_names_the_bad_one(items):
    refs = [Reference(image=Image.new("RGB", (w, h)), box=box) for w, h, box in items]
    try:
        built = mosaic.build_mosaic(refs)
    except RequestError as exc:
        assert_named(exc)
        return
    assert built.image.size == (mosaic.CANVAS, mosaic.CANVAS) and len(built.boxes) == len(refs)


def _containers(children: st.SearchStrategy) -> st.SearchStrategy:
    return st.lists(children, max_size=4) | st.dictionaries(
        st.text(max_size=10), children, max_size=4
    )


JSON = st.recursive(
    st.none() | st.booleans() | st.floats() | st.integers() | st.text(max_size=10),
    _containers,
    max_leaves=20,
)
OPTION_DICTS = st.dictionaries(
    st.sampled_from(
        ["router", "instance_masks", "mask_format", "instance_threshold", "version", "speed"]
    ),  # fmt: skip
    JSON,
    max_size=5,
)


@QUICK
@given(st.one_of(OPTION_DICTS.map(json.dumps), JSON.map(json.dumps), st.text(max_size=300)))
def test_options_are_valid_or_refused_by_name(text):
    try:
        options = Options.from_json(text)
    except RequestError as exc:
        assert_named(exc)
        return
    assert options == options.validate() and options.version == 1
    assert type(options.router) is bool and options.mask_format in contract.MASK_FORMATS


def _png(w: int, h: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (w, h), (1, 2, 3)).save(buffer, format="PNG")
    return buffer.getvalue()


GOOD_PNG = _png(40, 30)
MUTATION = st.tuples(st.integers(0, len(GOOD_PNG) - 1), st.integers(0, 255))


@QUICK
@given(st.one_of(st.binary(max_size=200), st.lists(MUTATION, min_size=1, max_size=4)))
def test_any_image_bytes_decode_or_are_refused_by_name(data):
    if isinstance(data, list):  # a valid PNG with a few bytes changed, or cut short
        raw = bytearray(GOOD_PNG)
        for at, value in data:
            raw[at] = value
        data = bytes(raw[: max(at for at, _ in data) + 1]) if len(data) > 3 else bytes(raw)
    try:
        image = contract.decode_image(data, "image", CONFIG)
    except RequestError as exc:
        assert_named(exc)
        return
    assert image.mode == "RGB" and image.width * image.height <= CONFIG.max_image_pixels


def _tensor(draw, name):
    kind = draw(st.sampled_from(["bytes", "float", "int", "str"]))
    shape = tuple(draw(st.lists(st.integers(0, 3), min_size=0, max_size=4)))
    if kind == "float":
        return np.full(shape, draw(st.floats(width=32)), np.float32)
    if kind == "int":
        return np.zeros(shape, np.int64)
    if kind == "str":
        return np.full(shape, draw(st.sampled_from(["mug", "", "\u00e9\u00e9"])), dtype="U8")
    item = draw(st.sampled_from([GOOD_PNG, b"", b"mug", "mug", b"\xff\xfe", b'{"router":1}']))
    array = np.empty(shape, dtype=np.object_)
    array.fill(item)
    return array


@st.composite
def request_arrays(draw):
    good = contract.to_request_arrays(GOOD_PNG, "mug", [(GOOD_PNG, (1, 1, 20, 20))])
    names = draw(st.sets(st.sampled_from([*INPUTS, "extra"]), max_size=6))
    arrays = {n: good[n] for n in names if n in good}
    if names:
        for name in draw(st.sets(st.sampled_from(sorted(names)), max_size=3)):
            arrays[name] = _tensor(draw, name)
    return arrays


@QUICK
@given(request_arrays())
def test_request_validation_gives_a_request_or_names_the_field(arrays):
    try:
        request, options = contract.from_request_arrays(dict(arrays), CONFIG)
    except RequestError as exc:
        assert_named(exc)
        return
    assert request.question.strip() and isinstance(options, Options)
    assert len(request.references) <= mosaic.MAX_REFERENCES


SPECIALS = ["<|image_pad|>", "<|im_end|>", "<|im_start|>", "<|vision_start|>", "<tool_call>",
            "</tool_call>", "<|endoftext|>"]  # fmt: skip


@QUICK
@given(st.lists(st.sampled_from([*SPECIALS, "<", "|", ">", "im_end", "a", " "]), max_size=30))
def test_prompt_text_never_holds_a_special_token_after_as_text(parts):
    text = "".join(parts)
    safe = qwen.as_text(text, SPECIALS)
    assert not any(token in safe for token in SPECIALS)
    assert safe.replace("\u200b", "") == text, "only zero-width spaces are added"
