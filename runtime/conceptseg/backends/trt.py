"""TensorRT plans for the exported graphs (``conceptseg build-engines``), GPU machines only.

The plans directory (``engines/NAME/trt-<precision>``) holds ``<graph>.plan`` + ``.plan.json``;
its parent holds the ONNX manifests and the tokenizer. The SAM 3 and CTM backends are the ones
ONNX Runtime uses (``conceptseg.models.engines``); only the graph runner differs.

``TensorRTSession(plan).run({"image": x})`` returns ``{output_name: np.ndarray}``. Buffers are
torch CUDA tensors; the engine runs on one non-default CUDA stream with ``execute_async_v3``. The
optimisation profile is chosen per call: the first one whose [min, max] range holds every input
shape (``build-engines`` orders them latency first, throughput last), or the one named in
``run(..., profile=)``. Nothing here imports TensorRT or touches CUDA at import time;
``import_tensorrt`` says how to install it.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from conceptseg import gpu_stack
from conceptseg.models.engines import EngineCtm, EngineSam3, find_plans
from conceptseg.types import RequestError

# The TensorRT of the deployment container (gpu_stack.toml): a plan loads only in the TensorRT
# that built it. PyPI ``tensorrt`` is a metapackage -> tensorrt_cu13 (CUDA 13).
TENSORRT_PIN = gpu_stack.load()["tensorrt"]
INSTALL_HINT = (
    f"run it in the deployment image ({gpu_stack.load().image}, docker/Dockerfile), or on a "
    f"machine with an NVIDIA GPU and driver: pip install {gpu_stack.load().requirement('tensorrt')} "
    "(and a CUDA build of torch for the buffers)"
)

# TensorRT DataType member name -> torch dtype name (numpy has no bfloat16; torch does).
TORCH_DTYPES = {
    "FLOAT": "float32",
    "HALF": "float16",
    "BF16": "bfloat16",
    "INT8": "int8",
    "INT32": "int32",
    "INT64": "int64",
    "BOOL": "bool",
    "UINT8": "uint8",
}


class TensorRTUnavailable(ImportError):
    """TensorRT (or a CUDA device for it) is missing; the message says how to get it."""


def import_tensorrt() -> Any:
    """``import tensorrt`` or raise :class:`TensorRTUnavailable` with install instructions."""
    try:
        import tensorrt as trt  # optional: TensorRT, GPU machines only
    except ImportError as exc:
        raise TensorRTUnavailable(f"TensorRT is not installed ({exc}); {INSTALL_HINT}") from None
    major = gpu_stack.load().tensorrt_major
    if str(trt.__version__).split(".")[0] != major:
        raise TensorRTUnavailable(
            f"found tensorrt {trt.__version__}, but this code uses the TensorRT {major} API of "
            f"the deployment container ({TENSORRT_PIN}); {INSTALL_HINT}"
        )
    return trt


def import_torch_cuda() -> Any:
    """``import torch`` with a usable CUDA device, or raise :class:`TensorRTUnavailable`."""
    import torch  # heavy: torch, only on this path

    if not torch.cuda.is_available():
        raise TensorRTUnavailable(
            f"no CUDA device visible to torch {torch.__version__} (CUDA build: "
            f"{torch.version.cuda}); TensorRT engines need an NVIDIA GPU"
        )
    return torch


Range = tuple[Sequence[int], Sequence[int], Sequence[int]]  # (min, opt, max) of one input


def pick_profile(
    profiles: Sequence[Mapping[str, Range]], shapes: Mapping[str, Sequence[int]]
) -> int:
    """Index of the first profile whose [min, max] holds every shape in ``shapes``.

    ``profiles[i][name] = (min, opt, max)``; inputs a profile does not list are unconstrained.
    Raises ValueError naming the shapes and the ranges when none fits.
    """
    for index, ranges in enumerate(profiles):
        fits = all(
            len(shape) == len(ranges[name][0])
            and all(
                lo <= d <= hi
                for d, lo, hi in zip(shape, ranges[name][0], ranges[name][2], strict=True)
            )
            for name, shape in shapes.items()
            if name in ranges
        )
        if fits:
            return index
    described = [{n: (list(r[0]), list(r[2])) for n, r in p.items()} for p in profiles]
    raise ValueError(
        f"no optimisation profile holds input shapes {dict(shapes)}; ranges (min, max): {described}"
    )


class TensorRTSession:
    """One deserialized engine, one execution context, one CUDA stream.

    ``plan``: path of a ``.plan`` file (its ``.plan.json`` manifest, when present, names the
    profiles) or the serialized bytes. Not thread-safe: one call at a time per session.
    """

    def __init__(self, plan: str | Path | bytes, *, device: int = 0, verbose: bool = False):
        trt = import_tensorrt()
        self._torch = torch = import_torch_cuda()
        self._device = torch.device("cuda", device)
        data = plan if isinstance(plan, bytes) else Path(plan).read_bytes()
        self._logger = trt.Logger(trt.Logger.VERBOSE if verbose else trt.Logger.WARNING)
        with torch.cuda.device(self._device):
            self._runtime = trt.Runtime(self._logger)
            self._engine = self._runtime.deserialize_cuda_engine(data)
            if self._engine is None:
                source = "the plan bytes" if isinstance(plan, bytes) else plan
                raise RuntimeError(
                    f"TensorRT could not deserialize {source}: built by another TensorRT version "
                    "or for another GPU? Rebuild it with `conceptseg build-engines` on this machine"
                )
            self._context = self._engine.create_execution_context()
            self._stream = torch.cuda.Stream(self._device)
        names = [self._engine.get_tensor_name(i) for i in range(self._engine.num_io_tensors)]
        is_input = [self._engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT for n in names]
        self.input_names = [n for n, i in zip(names, is_input, strict=True) if i]
        self.output_names = [n for n, i in zip(names, is_input, strict=True) if not i]
        self.profiles = [
            self._profile_ranges(p) for p in range(self._engine.num_optimization_profiles)
        ]
        self.profile_names = _profile_names(plan, len(self.profiles))
        self._active_profile = 0

    def _profile_ranges(self, index: int) -> dict[str, Range]:
        """(min, opt, max) of every input with a dynamic dimension under profile ``index``."""
        ranges: dict[str, Range] = {}
        for name in self.input_names:
            if all(d >= 0 for d in self._engine.get_tensor_shape(name)):
                continue  # static input: any profile accepts its one shape
            lo, opt, hi = (tuple(d) for d in self._engine.get_tensor_profile_shape(name, index))
            ranges[name] = (lo, opt, hi)
        return ranges

    def _dtype(self, name: str) -> Any:
        trt_name = self._engine.get_tensor_dtype(name).name
        if trt_name not in TORCH_DTYPES:
            raise TypeError(f"tensor {name!r} has TensorRT type {trt_name}, not supported here")
        return getattr(self._torch, TORCH_DTYPES[trt_name])

    def _to_device(self, name: str, value: np.ndarray) -> Any:
        array = np.ascontiguousarray(value)
        tensor = self._torch.from_numpy(array).to(self._device, non_blocking=False)
        wanted = self._dtype(name)
        if tensor.dtype != wanted:
            if tensor.is_floating_point() and not wanted.is_floating_point:
                raise TypeError(f"input {name!r}: got {array.dtype}, the engine wants {wanted}")
            tensor = tensor.to(wanted)  # e.g. float32 -> bfloat16, int64 -> int32, bool -> float
        return tensor

    def _select(self, shapes: dict[str, tuple[int, ...]], profile: int | str | None) -> int:
        if profile is None:
            return pick_profile(self.profiles, shapes)
        if isinstance(profile, str):
            if profile not in self.profile_names:
                raise ValueError(f"profile {profile!r} is not one of {self.profile_names}")
            return self.profile_names.index(profile)
        return profile

    def run(
        self,
        feeds: Mapping[str, np.ndarray],
        output_names: Sequence[str] | None = None,
        *,
        profile: int | str | None = None,
    ) -> dict[str, np.ndarray]:
        """Execute once. ``feeds``: every engine input by name. Returns the outputs by name
        (all, or ``output_names``) as numpy arrays; bfloat16 outputs come back as float32."""
        missing = set(self.input_names) - set(feeds)
        extra = set(feeds) - set(self.input_names)
        if missing or extra:
            raise ValueError(
                f"inputs: missing {sorted(missing)}, unexpected {sorted(extra)}; "
                f"the engine takes {self.input_names}"
            )
        torch, ctx = self._torch, self._context
        shapes = {n: tuple(np.shape(feeds[n])) for n in self.input_names}
        index = self._select(shapes, profile)
        with torch.cuda.device(self._device), torch.cuda.stream(self._stream):
            handle = self._stream.cuda_stream
            if index != self._active_profile:
                ctx.set_optimization_profile_async(index, handle)
                self._active_profile = index
            inputs = {n: self._to_device(n, feeds[n]) for n in self.input_names}
            for name, tensor in inputs.items():
                if not ctx.set_input_shape(name, tuple(tensor.shape)):
                    raise ValueError(
                        f"input {name!r} shape {tuple(tensor.shape)} is outside profile "
                        f"{self.profile_names[index]} {self.profiles[index].get(name)}"
                    )
                ctx.set_tensor_address(name, tensor.data_ptr())
            unresolved = ctx.infer_shapes()
            if unresolved:
                raise RuntimeError(f"TensorRT could not infer shapes of {unresolved} from {shapes}")
            outputs = {}
            for name in self.output_names:
                shape = tuple(ctx.get_tensor_shape(name))
                if any(d < 0 for d in shape):
                    raise RuntimeError(
                        f"output {name!r} has data-dependent shape {shape}; not supported"
                    )
                outputs[name] = torch.empty(shape, dtype=self._dtype(name), device=self._device)
                ctx.set_tensor_address(name, outputs[name].data_ptr())
            if not ctx.execute_async_v3(handle):
                raise RuntimeError("TensorRT execute_async_v3 failed; see the TensorRT log above")
            self._stream.synchronize()
        wanted = output_names or self.output_names
        return {n: _to_numpy(outputs[n]) for n in wanted}


def _to_numpy(tensor: Any) -> np.ndarray:
    import torch  # heavy: torch, only on this path

    if tensor.dtype == torch.bfloat16:
        tensor = tensor.float()
    return tensor.cpu().numpy()


def _profile_names(plan: str | Path | bytes, count: int) -> list[str]:
    """Names from ``<plan>.json`` (written by ``build-engines``), else ``profile0``..."""
    if not isinstance(plan, bytes):
        manifest = Path(str(plan) + ".json")
        if manifest.is_file():
            names = [p["name"] for p in json.loads(manifest.read_text()).get("profiles", [])]
            if len(names) == count:
                return names
    return [f"profile{i}" for i in range(count)]


class TrtGraph:
    """One plan behind the ``run(**feeds)`` call shape of :class:`~conceptseg.backends.ort.OrtGraph`."""

    def __init__(self, plans: Path, name: str) -> None:
        path = Path(plans) / f"{name}.plan"
        if not path.exists():
            raise RequestError(
                "--plans", f"{path} is missing; build it with `conceptseg build-engines`"
            )
        self.name = name
        self.session = TensorRTSession(path)

    def run(self, **feeds: np.ndarray) -> dict[str, np.ndarray]:
        return self.session.run(feeds)


def trt_sam3(engines: Path, plans: Path | None = None) -> EngineSam3:
    directory = find_plans(engines, plans)
    names = ("sam3_vision", "sam3_text", "sam3_heads")
    return EngineSam3(engines, {n: TrtGraph(directory, n) for n in names})


def trt_ctm(engines: Path, plans: Path | None = None) -> EngineCtm:
    return EngineCtm(engines, TrtGraph(find_plans(engines, plans), "ctm"))
