"""The glue every ``triton_repo`` model.py shares: parameters, tensors in and out, errors.

``pb_utils`` (``triton_python_backend_utils``, importable only inside the Python backend's stub)
is passed in by the model.py files: this package never imports it.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import numpy as np

from conceptseg.config import PipelineConfig
from conceptseg.types import AtCapacity, Cancelled, EngineDown, RequestError

MAX_BOXES = 64  # prompt boxes per SAM 3 call: the pipeline sends at most a few
_ADDRESS = re.compile(r"<[^<>]* at 0x[0-9a-fA-F]+>")  # object reprs: no addresses to clients


def model_params(args: dict[str, Any], required: tuple[str, ...]) -> dict[str, str]:
    """The ``parameters`` of a model's config, each required one present and filled."""
    config = json.loads(args["model_config"])
    params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
    for key in required:
        value = params.get(key)
        assert value is not None, (
            f"{config['name']}: parameter {key!r} is missing from config.pbtxt"
        )
        assert "${" not in value, f"{config['name']}: parameter {key}={value!r} was never filled"
    return params


def read_inputs(
    pb_utils: Any, request: Any, names: tuple[str, ...] | list[str]
) -> dict[str, np.ndarray]:
    """The request's tensors among ``names`` as numpy (absent optional inputs are left out)."""
    arrays = {}
    for name in names:
        tensor = pb_utils.get_input_tensor_by_name(request, name)
        if tensor is not None:
            arrays[name] = tensor.as_numpy()
    return arrays


def to_response(pb_utils: Any, arrays: dict[str, np.ndarray]) -> Any:
    return pb_utils.InferenceResponse(
        [pb_utils.Tensor(n, np.asarray(a)) for n, a in arrays.items()]
    )


def error_code(pb_utils: Any, exc: BaseException) -> Any:
    """The ``TritonError`` code for ``exc``: INVALID_ARG (:class:`RequestError`), CANCELLED
    (:class:`Cancelled`), UNAVAILABLE (:class:`AtCapacity`, :class:`EngineDown`), else INTERNAL."""
    codes = {
        RequestError: "INVALID_ARG",
        Cancelled: "CANCELLED",
        AtCapacity: "UNAVAILABLE",
        EngineDown: "UNAVAILABLE",
    }
    name = next((n for t, n in codes.items() if isinstance(exc, t)), "INTERNAL")
    return getattr(pb_utils.TritonError, name)


def error_response(pb_utils: Any, exc: BaseException, logger: Any = None) -> Any:
    """INVALID_ARG / CANCELLED / UNAVAILABLE for the typed errors (:func:`error_code`),
    INTERNAL (and a log line) for anything else."""
    if isinstance(exc, RequestError | Cancelled | AtCapacity | EngineDown):
        return pb_utils.InferenceResponse(
            error=pb_utils.TritonError(str(exc), error_code(pb_utils, exc))
        )
    if logger is not None:
        logger.log_error(f"request failed: {type(exc).__name__}: {exc}")
    message = _ADDRESS.sub("<object>", str(exc))[:500]
    return pb_utils.InferenceResponse(
        error=pb_utils.TritonError(f"internal error: {message}", pb_utils.TritonError.INTERNAL)
    )


def pipeline_config(params: dict[str, str]) -> PipelineConfig:
    """The ``pipeline_config`` parameter (JSON of PipelineConfig fields) as a config."""
    try:
        return PipelineConfig(**json.loads(params["pipeline_config"]))
    except (TypeError, ValueError) as exc:
        raise AssertionError(f"parameter pipeline_config: {exc}") from None


def engine_bounds(engines: Path) -> dict[str, int]:
    """Upper bounds of the engine graphs' dynamic dims (``seq``: the largest CTM bucket;
    ``num_boxes``: the most prompt boxes the pipeline sends) and of SAM 3's token ids
    (``vocab``), from the engines' manifest and the SAM 3 checkpoint's config."""
    manifest = Path(engines) / "manifest.json"
    if not manifest.exists():  # a lone graph (tests): only the box bound
        return {"num_boxes": MAX_BOXES}
    top = json.loads(manifest.read_text())
    bounds = {"seq": max(int(b) for b in top["ctm_buckets"]), "num_boxes": MAX_BOXES}
    sam3 = Path(top.get("sam3", "")) / "config.json"
    if top.get("sam3") and sam3.exists():  # token ids index the text encoder's embedding
        bounds["vocab"] = int(json.loads(sam3.read_text())["text_config"]["vocab_size"])
    return bounds


def graph_inputs(engines: Path, graph: str) -> dict[str, list[Any]]:
    """Each input of ``engines/<graph>.onnx`` and its shape (a dynamic dim by its name, e.g.
    ``batch``, ``seq``), from the graph's manifest ``<graph>.json``, whatever runs the graph."""
    manifest = json.loads((Path(engines) / f"{graph}.json").read_text())
    return {t["name"]: list(t["shape"]) for t in manifest["inputs"]}


def check_engine_feed(
    feed: dict[str, np.ndarray], shapes: dict[str, list[Any]], bounds: dict[str, int]
) -> None:
    """An engine model's request, re-checked (clients can call engine models directly): every
    graph input present, named dynamic dims within ``bounds`` and equal across inputs, float
    inputs finite and masks 0/1. Raises RequestError naming the tensor."""
    seen: dict[str, int] = {}
    for name, shape in shapes.items():
        array = feed.get(name)
        if array is None:
            raise RequestError(name, "missing; every input of this model is required")
        for dim, size in zip(shape[1:], array.shape[1:], strict=False):
            if not isinstance(dim, str):
                continue
            if size > bounds.get(dim, size):
                raise RequestError(name, f"{dim} = {size} is over the limit of {bounds[dim]}")
            if seen.setdefault(dim, size) != size:
                raise RequestError(name, f"{dim} = {size} differs from {seen[dim]} elsewhere")
        if array.dtype.kind == "f" and not np.isfinite(array).all():
            raise RequestError(name, "holds NaN or infinite values; send finite numbers")
        if name.endswith("mask") and array.size and not np.isin(array, (0, 1)).all():
            raise RequestError(name, "a mask holds values other than 0 and 1")
        vocab = bounds.get("vocab")
        if (
            name == "input_ids"
            and vocab
            and array.size
            and not (0 <= array.min() <= array.max() < vocab)
        ):
            raise RequestError(name, f"token ids must be in [0, {vocab})")


def group_by_shape(feeds: list[dict[str, np.ndarray]]) -> list[list[int]]:
    """Indices of requests whose inputs have equal shapes past the batch dim (one run each)."""
    groups: dict[tuple, list[int]] = {}
    for i, feed in enumerate(feeds):
        key = tuple((n, a.dtype.str, a.shape[1:]) for n, a in sorted(feed.items()))
        groups.setdefault(key, []).append(i)
    return list(groups.values())


def run_batched(
    graph: Any, feeds: list[dict[str, np.ndarray]]
) -> list[dict[str, np.ndarray] | Exception]:
    """Run a dynamic batch through ``graph`` one concatenated call per shape group.

    Returns, per request, its outputs (split back by batch rows) or the exception its group hit.
    """
    results: list[dict[str, np.ndarray] | Exception] = [{} for _ in feeds]
    for group in group_by_shape(feeds):
        try:
            batch = {n: np.concatenate([feeds[i][n] for i in group]) for n in feeds[group[0]]}
            out = graph.run(**batch)
            start = 0
            for i in group:
                rows = feeds[i][next(iter(feeds[i]))].shape[0]
                results[i] = {n: a[start : start + rows] for n, a in out.items()}
                start += rows
        except Exception as exc:  # noqa: BLE001 - reported per request by the caller
            for i in group:
                results[i] = exc
    return results


def send_final_error(pb_utils: Any, sender: Any, exc: BaseException) -> None:
    """The error as a decoupled request's final response; if even that cannot be sent (the
    request was cancelled, or its final response already went), the log says so and the model
    goes on."""
    try:
        sender.send(error_response(pb_utils, exc, pb_utils.Logger),
                    flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)  # fmt: skip
    except Exception as lost:  # noqa: BLE001
        pb_utils.Logger.log_error(f"could not answer a request ({exc!r}): {lost!r}")
        try:  # a flag-only final response still releases the request (e.g. a cancelled stream)
            sender.send(flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
        except Exception:  # noqa: BLE001, S110 - already closed: nothing is held
            pass
