"""The serving wire format, version 1: request and response tensors of the ``conceptseg`` model.

Pure (numpy, PIL, json): the Triton BLS model decodes requests with ``from_request_arrays`` and
encodes results with ``to_response_arrays``; ``conceptseg.client`` does the inverse. Every bad
request raises :class:`~conceptseg.types.RequestError` naming the tensor (or option) and the rule.

Request tensors (leading dimension = batch, always 1 per request):

======== ===== ========== ==========================================================
name     dtype shape      meaning
======== ===== ========== ==========================================================
image    BYTES (1, 1)     target image, encoded PNG or JPEG
prompt   BYTES (1, 1)     UTF-8 question / concept, e.g. "red mug"
ref_images BYTES (1, N)   optional, N = 0..4 encoded reference images
ref_boxes FP32 (1, N, 4)  optional, xyxy box of the concept in each reference's pixels
options  BYTES (1, 1)     optional JSON object, keys in :class:`Options`
======== ===== ========== ==========================================================

Response tensors: ``mask`` BYTES (1, 1) (PNG, 255 = concept, or COCO RLE JSON), ``result``
BYTES (1, 1) (JSON: ``Result.to_json()`` keys + ``contract``, ``mask_format``, ``instances``) and
``instance_masks`` BYTES (1, K) (same encoding as ``mask``; K = 0 unless asked for).
Boxes in the result are xyxy in original target pixels (``check``: reference 0's pixels).
"""

from __future__ import annotations

import io
import json
import math
import re
from dataclasses import asdict, dataclass, fields
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError
from pycocotools import mask as coco_mask

from conceptseg import limits
from conceptseg.config import PipelineConfig
from conceptseg.masks import to_png
from conceptseg.mosaic import validate_reference
from conceptseg.types import Box, Reference, Request, RequestError, Result

CONTRACT_VERSION = 1
# the decoders PIL may try (nothing else is parsed); PIL's JPEG decoder also opens MPO, the
# multi-picture JPEG phone cameras write: its first picture is an ordinary JPEG
IMAGE_FORMATS = ("PNG", "JPEG")
MASK_FORMATS = ("png", "rle")
MAX_OPTIONS_BYTES = 4096  # the options JSON: a few keys; bounds nesting and number sizes too
_MAGIC = (
    (b"GIF8", "GIF"), (b"BM", "BMP"), (b"RIFF", "WEBP"), (b"II*\x00", "TIFF"),
    (b"MM\x00*", "TIFF"), (b"\x00\x00\x01\x00", "ICO"), (b"8BPS", "PSD"),
)  # fmt: skip
_ADDRESS = re.compile(r"<[^<>]* at 0x[0-9a-fA-F]+>")  # "<_io.BytesIO object at 0x...>"


@dataclass(frozen=True)
class TensorSpec:
    """One tensor of a model's interface: Triton dtype name and dims after the batch dimension."""

    dtype: str  # "BYTES", "FP32", "INT64", "BOOL"
    dims: tuple[int, ...]  # -1 = any length
    optional: bool = False


INPUTS = {
    "image": TensorSpec("BYTES", (1,)),
    "prompt": TensorSpec("BYTES", (1,)),
    "ref_images": TensorSpec("BYTES", (-1,), optional=True),
    "ref_boxes": TensorSpec("FP32", (-1, 4), optional=True),
    "options": TensorSpec("BYTES", (1,), optional=True),
}
OUTPUTS = {
    "mask": TensorSpec("BYTES", (1,)),
    "result": TensorSpec("BYTES", (1,)),
    "instance_masks": TensorSpec("BYTES", (-1,)),
}
# ``conceptseg_stream`` (decoupled, gRPC streaming): the same inputs; zero or more interim
# responses holding only ``text``, the reasoning text in deltas as the MLLM generates it (none on
# the fast path), then one final response with OUTPUTS. The deltas join to ``result["text"]``.
STREAM_MODEL = "conceptseg_stream"
STREAM_OUTPUTS = {"text": TensorSpec("BYTES", (1,)), **OUTPUTS}
NUMPY_DTYPES = {"BYTES": np.object_, "FP32": np.float32, "INT64": np.int64, "BOOL": np.bool_}


@dataclass(frozen=True)
class Options:
    """Per-request switches (the ``options`` JSON); unknown keys are refused."""

    router: bool = True  # probe SAM 3 first (False: always reason)
    instance_masks: bool = False  # also return SAM 3's instance masks of the final call
    mask_format: str = "png"  # "png" or "rle" (COCO compressed RLE, column-major)
    instance_threshold: float = 0.5  # keep instances scoring at least this
    version: int = CONTRACT_VERSION

    def validate(self) -> Options:
        for name in ("router", "instance_masks"):
            if not isinstance(getattr(self, name), bool):
                raise RequestError(f"options.{name}", "must be true or false")
        if self.mask_format not in MASK_FORMATS:
            raise RequestError(
                "options.mask_format", f"{_show(self.mask_format)}: use one of {MASK_FORMATS}"
            )
        t = self.instance_threshold
        if isinstance(t, bool) or not isinstance(t, int | float) or not 0 <= t <= 1:
            raise RequestError("options.instance_threshold", f"{_show(t)}: give a number in [0, 1]")
        v = self.version
        if isinstance(v, bool) or not isinstance(v, int) or v != CONTRACT_VERSION:
            raise RequestError(
                "options.version",
                f"{_show(v)}: this server speaks version {CONTRACT_VERSION}",
            )
        return self

    @classmethod
    def from_json(cls, text: str) -> Options:
        if len(text.encode("utf-8", "replace")) > MAX_OPTIONS_BYTES:
            raise RequestError(
                "options", f"over {MAX_OPTIONS_BYTES} bytes; give a small JSON object"
            )
        try:
            raw = json.loads(text) if text.strip() else {}
        except json.JSONDecodeError as exc:
            raise RequestError(
                "options", f"not valid JSON ({exc.msg}); give a JSON object"
            ) from None
        except (RecursionError, ValueError) as exc:  # nesting too deep, an integer too long
            raise RequestError(
                "options", f"not accepted JSON ({_clean(exc)}); give a flat object"
            ) from None
        if not isinstance(raw, dict):
            raise RequestError("options", f"got a JSON {type(raw).__name__}; give a JSON object")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(raw) - known)
        if unknown:
            raise RequestError("options", f"unknown option(s) {unknown}; allowed: {sorted(known)}")
        return cls(**raw).validate()

    def to_json(self) -> str:
        return json.dumps(asdict(self))


# --- checks shared by both directions -----------------------------------------------------------


def check_tensor(name: str, array: Any, spec: TensorSpec) -> np.ndarray:
    """``array`` as numpy with the batch dimension of 1, or RequestError naming ``name``."""
    array = np.asarray(array)
    want = NUMPY_DTYPES[spec.dtype]
    ok_dtype = array.dtype == want or (spec.dtype == "BYTES" and array.dtype.kind in "OS")
    if not ok_dtype:
        raise RequestError(name, f"dtype {array.dtype} is wrong; send {spec.dtype}")
    shape = tuple(array.shape)
    fits = len(shape) == len(spec.dims) + 1 and shape[0] == 1
    fits = fits and all(d == -1 or d == s for d, s in zip(spec.dims, shape[1:], strict=False))
    if not fits:
        dims = ", ".join("N" if d == -1 else str(d) for d in spec.dims)
        raise RequestError(name, f"shape {list(shape)} is wrong; send (1, {dims})")
    return array


def _bytes(value: Any, name: str) -> bytes:
    if isinstance(value, bytes | np.bytes_):
        return bytes(value)
    if isinstance(value, str):
        return value.encode()
    raise RequestError(name, f"element of type {type(value).__name__}; send bytes")


def _show(value: Any) -> str:
    """A client's value in a message: its JSON-ish repr, at most 40 characters."""
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _clean(exc: BaseException) -> str:
    """An exception's message for a client: no object addresses, at most 200 characters."""
    return _ADDRESS.sub("<data>", str(exc))[:200]


def _sniff(data: bytes) -> str:
    """The format PIL would name for ``data``, by magic bytes only (for the refusal message)."""
    for magic, fmt in _MAGIC:
        if data.startswith(magic):
            return fmt
    return ""


def decode_image(
    data: bytes, name: str, cfg: PipelineConfig, budget: limits.PixelBudget | None = None
) -> Image.Image:
    """Encoded PNG/JPEG -> RGB image, checking size limits before decoding the pixels.

    Only PIL's PNG and JPEG decoders ever see the data. The declared size is checked against
    ``cfg.max_image_pixels`` before a pixel is decoded (PIL's own decompression-bomb refusal of
    larger declarations says the same), so memory per image is bounded by the allowed pixels.
    Every failure of the decoders on these bytes is the client's data: RequestError.
    """
    limits.check_bytes(name, len(data), cfg)
    try:
        image = Image.open(io.BytesIO(data), formats=IMAGE_FORMATS)
    except Image.DecompressionBombError as exc:
        raise RequestError(
            name,
            f"declared size is over the limit of {cfg.max_image_pixels} pixels ({_clean(exc)})",
        ) from None
    except UnidentifiedImageError:
        other = f" (it looks like {_sniff(data)})" if _sniff(data) else ""
        raise RequestError(
            name, f"cannot read it as a PNG or JPEG image{other}; send PNG or JPEG"
        ) from None
    except Exception as exc:  # noqa: BLE001 - any parser failure on client bytes is bad input
        if isinstance(exc, MemoryError):
            raise
        raise RequestError(
            name, f"cannot read it as an image ({_clean(exc)}); send PNG or JPEG"
        ) from None
    w, h = image.size
    limits.check_pixels(name, w, h, cfg)
    if budget is not None:
        budget.take(name, w, h)
    try:
        image.seek(0)  # MPO: the first picture
        image.load()
        return image.convert("RGB")
    except Exception as exc:  # noqa: BLE001 - truncated data, corrupt chunks, huge metadata
        if isinstance(exc, MemoryError):
            raise
        raise RequestError(
            name, f"cannot decode the image data ({_clean(exc)}); send PNG or JPEG"
        ) from None


def encode_image(image: Image.Image | bytes, fmt: str = "PNG") -> bytes:
    """PNG bytes of ``image`` (bytes are passed through: already encoded)."""
    if isinstance(image, bytes | bytearray):
        return bytes(image)
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


# --- request: client -> server ------------------------------------------------------------------


def to_request_arrays(
    image: Image.Image | bytes,
    prompt: str,
    references: list[tuple[Image.Image | bytes, Box]] | tuple = (),
    options: Options | None = None,
) -> dict[str, np.ndarray]:
    """Request tensors for one request (images given as PIL or already-encoded bytes)."""
    arrays = {
        "image": np.array([[encode_image(image)]], dtype=np.object_),
        "prompt": np.array([[prompt.encode()]], dtype=np.object_),
    }
    if references:
        arrays["ref_images"] = np.array(
            [[encode_image(img) for img, _ in references]], dtype=np.object_
        )
        arrays["ref_boxes"] = np.array([[list(box) for _, box in references]], np.float32)
    if options is not None:
        arrays["options"] = np.array([[options.to_json().encode()]], dtype=np.object_)
    return arrays


def _references(
    arrays: dict[str, np.ndarray], cfg: PipelineConfig, budget: limits.PixelBudget
) -> tuple[Reference, ...]:
    images = arrays.get("ref_images")
    boxes = arrays.get("ref_boxes")
    if images is None and boxes is None:
        return ()
    if images is None or boxes is None:
        given, missing = (
            ("ref_images", "ref_boxes") if boxes is None else ("ref_boxes", "ref_images")
        )
        raise RequestError(missing, f"{given} was sent without {missing}; send both or neither")
    n = images.shape[1]
    limits.check_reference_count("ref_images", n)
    if boxes.shape[1] != n:
        raise RequestError("ref_boxes", f"{boxes.shape[1]} boxes for {n} ref_images; one box each")
    refs = []
    for i in range(n):
        name = f"ref_images[{i}]"
        image = decode_image(_bytes(images[0, i], name), name, cfg, budget)
        box = tuple(float(v) for v in boxes[0, i])
        if not all(math.isfinite(v) for v in box):
            raise RequestError(f"ref_boxes[{i}]", f"box {list(box)} must be 4 finite numbers")
        ref = Reference(image=image, box=box)  # type: ignore[arg-type]
        try:
            validate_reference(ref, i)
        except RequestError as exc:  # same rule, named by the tensor the client sent
            raise RequestError(f"ref_boxes[{i}]", exc.message) from None
        refs.append(ref)
    return tuple(refs)


def from_request_arrays(
    arrays: dict[str, np.ndarray], cfg: PipelineConfig
) -> tuple[Request, Options]:
    """Validate and decode request tensors; ``cfg`` gives the size and length limits."""
    unknown = sorted(set(arrays) - set(INPUTS))
    if unknown:
        raise RequestError(unknown[0], f"unknown input; the inputs are {sorted(INPUTS)}")
    for name, spec in INPUTS.items():
        if name not in arrays:
            if not spec.optional:
                raise RequestError(name, "missing; it is required")
            continue
        arrays[name] = check_tensor(name, arrays[name], spec)
    try:
        question = _bytes(arrays["prompt"][0, 0], "prompt").decode("utf-8")
    except UnicodeDecodeError:
        raise RequestError("prompt", "not valid UTF-8; send UTF-8 text") from None
    limits.check_prompt(question, cfg)
    options = Options()
    if "options" in arrays:
        raw = _bytes(arrays["options"][0, 0], "options")
        try:
            options = Options.from_json(raw.decode("utf-8"))
        except UnicodeDecodeError:
            raise RequestError("options", "not valid UTF-8 JSON") from None
    budget = limits.PixelBudget(cfg)
    image = decode_image(_bytes(arrays["image"][0, 0], "image"), "image", cfg, budget)
    references = _references(arrays, cfg, budget)
    request = Request(image=image, question=question, references=references)
    return request, options


# --- masks: PNG or COCO RLE ---------------------------------------------------------------------


def to_rle(mask: np.ndarray) -> dict[str, Any]:
    """COCO compressed RLE of a bool (H, W) mask: ``{"size": [H, W], "counts": str}``
    (pycocotools' ``encode``: column-major runs, its string form)."""
    rle = coco_mask.encode(np.asfortranarray(np.asarray(mask, np.uint8)))
    return {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode("ascii")}


def from_rle(rle: dict[str, Any]) -> np.ndarray:
    """Inverse of :func:`to_rle`: bool (H, W)."""
    coded = {"size": list(rle["size"]), "counts": str(rle["counts"]).encode("ascii")}
    return coco_mask.decode(coded).astype(bool)


def encode_mask(mask: np.ndarray, fmt: str) -> bytes:
    if fmt == "rle":
        return json.dumps(to_rle(mask)).encode()
    return to_png(mask)


def decode_mask(data: bytes, fmt: str) -> np.ndarray:
    if fmt == "rle":
        return from_rle(json.loads(data))
    with Image.open(io.BytesIO(data)) as image:
        return np.asarray(image.convert("L")) > 0


# --- response: server -> client -----------------------------------------------------------------


def to_response_arrays(result: Result, options: Options) -> dict[str, np.ndarray]:
    info = result.to_json()
    info.update(contract=CONTRACT_VERSION, mask_format=options.mask_format)
    masks = [encode_mask(i.mask, options.mask_format) for i in result.instances]
    return {
        "mask": np.array([[encode_mask(result.mask, options.mask_format)]], dtype=np.object_),
        "result": np.array([[json.dumps(info).encode()]], dtype=np.object_),
        "instance_masks": np.array([masks], dtype=np.object_).reshape(1, len(masks)),
    }


def text_delta_arrays(delta: str) -> dict[str, np.ndarray]:
    """An interim response of ``conceptseg_stream``: one text delta, batch dim included."""
    return {"text": np.array([[delta.encode()]], dtype=np.object_)}


@dataclass
class Response:
    """A decoded response: bool (H, W) ``mask``, the ``result`` JSON, instance masks in order."""

    mask: np.ndarray
    result: dict[str, Any]
    instance_masks: list[np.ndarray]


def from_response_arrays(arrays: dict[str, np.ndarray]) -> Response:
    result = json.loads(_bytes(np.asarray(arrays["result"]).ravel()[0], "result"))
    fmt = result["mask_format"]
    mask = decode_mask(_bytes(np.asarray(arrays["mask"]).ravel()[0], "mask"), fmt)
    raw = arrays.get("instance_masks")
    instance_masks = (
        [] if raw is None else [decode_mask(_bytes(b, "mask"), fmt) for b in raw.ravel()]
    )
    return Response(mask=mask, result=result, instance_masks=instance_masks)
