"""What ``Result.versions`` and the export manifests record: package versions, read from the
installed distributions' metadata (nothing is imported, so the serving core stays light)."""

from __future__ import annotations

import platform
from importlib import metadata
from pathlib import Path
from typing import Any

import conceptseg
from conceptseg.weights import is_synthetic

PACKAGES = ("torch", "transformers", "onnx", "onnxruntime", "onnxruntime-genai", "openvino", "tensorrt",
            "tensorrt_llm")  # fmt: skip


def package_versions(names: tuple[str, ...] = PACKAGES) -> dict[str, str]:
    """``{name: version}`` of the installed distributions among ``names`` (absent ones left out)."""
    found = {"conceptseg": conceptseg.__version__, "python": platform.python_version()}
    for name in names:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return found


def versions(weights: Path, **backends: str) -> dict[str, Any]:
    """Versions of a pipeline on ``weights``, with the backends that serve it."""
    return {
        **package_versions(),
        "weights": str(weights),
        "synthetic_weights": is_synthetic(weights),
        **backends,
    }
