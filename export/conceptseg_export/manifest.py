"""What every export manifest records: file hashes (``conceptseg.weights.sha256_files``) and
the versions that made the graphs."""

from __future__ import annotations

from conceptseg.versions import package_versions
from conceptseg.weights import sha256_files

__all__ = ["export_versions", "sha256_files"]


def export_versions() -> dict[str, str]:
    """Versions recorded in every graph manifest."""
    return package_versions(("torch", "transformers", "onnx", "onnxruntime"))
