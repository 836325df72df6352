"""TensorRT plans for the exported graphs (``conceptseg build-engines``), GPU machines only.

The plans directory (``engines/NAME/trt-<precision>``) holds ``<graph>.plan`` + ``.plan.json``;
its parent holds the ONNX manifests and the tokenizer. The backends are the ones ONNX Runtime
uses (``engines.py``); only the graph runner differs.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from conceptseg.backends.engines import EngineCtm, EngineSam3
from conceptseg.types import RequestError


def find_one(engines: Path, pattern: str, flag: str, hint: str) -> Path:
    """The single ``engines/<pattern>`` directory, or a RequestError naming ``flag``."""
    found = sorted(p for p in Path(engines).glob(pattern) if p.is_dir())
    if len(found) != 1:
        raise RequestError(
            flag,
            f"{engines} has {len(found)} {pattern} directories ({[p.name for p in found]}); "
            f"{hint} or name one with {flag}",
        )
    return found[0]


def find_plans(engines: Path, plans: Path | None = None) -> Path:
    """The plans directory: ``plans`` if given, else the one ``engines/trt-*`` directory."""
    if plans is not None:
        return Path(plans)
    return find_one(
        engines, "trt-*", "--plans", "build one with `conceptseg build-engines --onnx ENGINES`"
    )


class TrtGraph:
    """One plan behind the ``run(**feeds)`` call shape of :class:`~conceptseg.backends.ort.OrtGraph`."""

    def __init__(self, plans: Path, name: str) -> None:
        from conceptseg_export.trt_runtime import TensorRTSession

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
