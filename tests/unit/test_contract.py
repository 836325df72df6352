"""The serving wire format: request/response round trips, every bad-input kind, COCO RLE.

Run: .venv/bin/pytest tests/unit/test_contract.py -q
"""

import io
import json

import numpy as np
import pytest
from PIL import Image

from conceptseg import contract
from conceptseg.config import PipelineConfig
from conceptseg.contract import Options
from conceptseg.types import Answer, Instance, RequestError, Result

CFG = PipelineConfig(max_prompt_chars=50, max_image_pixels=200 * 200, max_image_bytes=60_000)


def png(w=64, h=48, color=(200, 30, 30), fmt="PNG"):
    buffer = io.BytesIO()
    Image.new("RGB", (w, h), color).save(buffer, format=fmt)
    return buffer.getvalue()


def arrays(**changes):
    base = contract.to_request_arrays(
        png(), "red mug", [(png(40, 30), (2, 3, 20, 25)), (png(50, 50), (0, 0, 10, 10))]
    )
    for key, value in changes.items():
        if value is None:
            base.pop(key, None)
        else:
            base[key] = value
    return base


def obj(*items):
    return np.array([list(items)], dtype=np.object_)


def test_round_trip_request():
    request, options = contract.from_request_arrays(arrays(options=obj(b'{"router": false}')), CFG)
    assert request.question == "red mug" and request.image.size == (64, 48)
    assert [r.image.size for r in request.references] == [(40, 30), (50, 50)]
    assert request.references[0].box == (2.0, 3.0, 20.0, 25.0)
    assert options == Options(router=False), "given options override the defaults, the rest stay"


def test_no_references_and_default_options():
    request, options = contract.from_request_arrays(arrays(ref_images=None, ref_boxes=None), CFG)
    assert request.references == () and options == Options()


def test_jpeg_is_accepted():
    request, _ = contract.from_request_arrays(arrays(image=obj(png(fmt="JPEG"))), CFG)
    assert request.image.size == (64, 48)


def _boxes(*rows):
    return np.array([list(rows)], np.float32)


BAD = {
    "unreadable image": (dict(image=obj(b"not an image")), "image", "cannot read"),
    "zero-size image": (dict(image=obj(b"")), "image", "zero-size"),
    "image over the byte limit": (dict(image=obj(b"\x89PNG" + bytes(70_000))), "image", "limit"),
    "image over the pixel limit": (
        dict(image=obj(png(300, 300))),
        "image",
        "limit of 40000 pixels",
    ),
    "not PNG or JPEG": (dict(image=obj(png(fmt="BMP"))), "image", "send PNG or JPEG"),
    "empty prompt": (dict(prompt=obj(b"   ")), "prompt", "empty"),
    "overlong prompt": (dict(prompt=obj(b"x" * 51)), "prompt", "over the limit of 50"),
    "prompt not UTF-8": (dict(prompt=obj(b"\xff\xfe")), "prompt", "UTF-8"),
    "five references": (
        dict(ref_images=obj(*[png(20, 20)] * 5), ref_boxes=_boxes(*[[0, 0, 5, 5]] * 5)),
        "ref_images",
        "give 0 to 4",
    ),
    "boxes without images": (dict(ref_images=None), "ref_images", "send both or neither"),
    "box count mismatch": (dict(ref_boxes=_boxes([0, 0, 5, 5])), "ref_boxes", "one box each"),
    "NaN box": (
        dict(ref_boxes=_boxes([0, 0, 5, float("nan")], [0, 0, 5, 5])),
        "ref_boxes[0]",
        "finite",
    ),
    "box outside its image": (
        dict(ref_boxes=_boxes([0, 0, 5, 5], [0, 0, 60, 10])),
        "ref_boxes[1]",
        "0 <= x1 < x2 <= 50",
    ),
    "box with x1 > x2": (
        dict(ref_boxes=_boxes([9, 0, 5, 5], [0, 0, 5, 5])),
        "ref_boxes[0]",
        "x1 < x2",
    ),
    "wrong dtype": (dict(ref_boxes=np.zeros((1, 2, 4), np.float64)), "ref_boxes", "send FP32"),
    "wrong shape": (dict(ref_boxes=np.zeros((1, 2, 3), np.float32)), "ref_boxes", "(1, N, 4)"),
    "batch of two": (dict(prompt=np.array([[b"a"], [b"b"]], dtype=object)), "prompt", "shape"),
    "missing prompt": (dict(prompt=None), "prompt", "required"),
    "unknown input": (dict(extra=obj(b"x")), "extra", "unknown input"),
    "unknown option": (dict(options=obj(b'{"turbo": true}')), "options", "unknown option"),
    "options not JSON": (dict(options=obj(b"{router")), "options", "not valid JSON"),
    "options not an object": (dict(options=obj(b"[1]")), "options", "JSON object"),
    "option of the wrong type": (
        dict(options=obj(b'{"router": "no"}')),
        "options.router",
        "true or false",
    ),
    "bad mask format": (dict(options=obj(b'{"mask_format": "bmp"}')), "options.mask_format", "png"),
    "threshold out of range": (
        dict(options=obj(b'{"instance_threshold": 2}')),
        "options.instance_threshold",
        "[0, 1]",
    ),
    "other contract version": (
        dict(options=obj(b'{"version": 2}')),
        "options.version",
        "version 1",
    ),
}


@pytest.mark.parametrize("kind", list(BAD))
def test_bad_request_names_field_and_rule(kind):
    changes, field, rule = BAD[kind]
    with pytest.raises(RequestError) as info:
        contract.from_request_arrays(arrays(**changes), CFG)
    message = str(info.value)
    assert info.value.field == field and message.startswith(f"{field}: "), message
    assert rule in message, f"{kind}: {message!r} does not say {rule!r}"


def test_rle_matches_pycocotools_strings():
    # pycocotools.mask.encode(np.asfortranarray(m.astype(np.uint8))) of these masks
    m = np.zeros((4, 5), bool)
    m[1:3, 1:4] = True
    assert contract.to_rle(m) == {"size": [4, 5], "counts": "5220003"}
    big = np.zeros((40, 70), bool)
    big[5:30, 3:60] = True
    big[0, 0] = True
    assert contract.to_rle(big)["counts"] == "01l3h0cL" + "0" * 111 + "[<"


@pytest.mark.parametrize("seed", range(5))
def test_rle_round_trip(seed):
    rng = np.random.default_rng(seed)
    h, w = rng.integers(1, 50, 2)
    mask = rng.random((h, w)) < [0.0, 0.1, 0.5, 0.9, 1.0][seed]
    assert (contract.from_rle(contract.to_rle(mask)) == mask).all()


def result():
    mask = np.zeros((48, 64), bool)
    mask[10:20, 5:30] = True
    return Result(
        mask=mask,
        route="reason",
        presence=0.2,
        threshold=0.4,
        answer=Answer(think="t", rule="r", answer="mug", complete=True),
        bbox=(1.0, 2.0, 3.0, 4.0),
        timings_ms={"mllm": 1.0},
    )


@pytest.mark.parametrize("fmt", contract.MASK_FORMATS)
def test_round_trip_response(fmt):
    inst = [Instance(0.9, (1.0, 2.0, 30.0, 40.0), np.eye(48, 64, dtype=bool))]
    served = result()
    served.instances = inst
    out = contract.to_response_arrays(served, Options(mask_format=fmt))
    assert {n: a.shape for n, a in out.items()} == {
        "mask": (1, 1),
        "result": (1, 1),
        "instance_masks": (1, 1),
    }
    back = contract.from_response_arrays(out)
    assert (back.mask == result().mask).all() and (back.instance_masks[0] == inst[0].mask).all()
    info = back.result
    assert info["contract"] == 1 and info["mask_format"] == fmt and info["answer"] == "mug"
    assert info["instances"] == [{"score": 0.9, "bbox": [1.0, 2.0, 30.0, 40.0]}]
    assert set(result().to_json()) <= set(info), "every key of `conceptseg segment`'s JSON"


def test_no_instances_gives_empty_tensor():
    out = contract.to_response_arrays(result(), Options())
    assert out["instance_masks"].shape == (1, 0)
    assert contract.from_response_arrays(out).instance_masks == []


def test_options_json_round_trip():
    options = Options(router=False, instance_masks=True, mask_format="rle", instance_threshold=0.3)
    assert Options.from_json(options.to_json()) == options
    assert json.loads(Options().to_json())["version"] == contract.CONTRACT_VERSION
