"""What every export manifest records: file hashes and the versions that made the graphs."""

from __future__ import annotations

import hashlib
from pathlib import Path

from conceptseg.versions import package_versions


def sha256_files(paths: list[Path]) -> str:
    """One sha256 over the bytes of ``paths`` in order (a checkpoint's shards, a graph + data)."""
    digest = hashlib.sha256()
    for path in paths:
        with open(path, "rb") as fh:
            digest.update(hashlib.file_digest(fh, "sha256").digest())
    return digest.hexdigest()


def export_versions() -> dict[str, str]:
    """Versions recorded in every graph manifest."""
    return package_versions(("torch", "transformers", "onnx", "onnxruntime"))
