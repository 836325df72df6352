"""The weights directory's layout (``DIR/mllm``, ``DIR/sam3``), checked without loading anything.

Pure (json and paths): the CLI checks ``--weights`` before a model loads; the loaders live in
``checkpoints``.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from conceptseg.types import UsageError

SYNTHETIC_MARKER = "conceptseg_synthetic.json"  # written by `conceptseg synth` beside mllm/, sam3/


def is_synthetic(weights: Path) -> bool:
    """Whether ``weights`` was written by ``conceptseg synth`` (random weights)."""
    return (Path(weights) / SYNTHETIC_MARKER).exists()


def safetensors_files(directory: Path) -> list[Path]:
    """The safetensors files of a checkpoint directory (single file or sharded with an index)."""
    index = directory / "model.safetensors.index.json"
    if index.exists():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [directory / n for n in names]
    single = directory / "model.safetensors"
    return [single] if single.exists() else []


def check_checkpoint_dir(directory: Path, kind: str, needed: tuple[str, ...]) -> None:
    """Raise :class:`UsageError` if ``directory`` is not a ``kind`` checkpoint."""
    field = f"--weights ({kind})"
    if not directory.is_dir():
        raise UsageError(
            field,
            f"{directory} is not a directory; create one with "
            "`conceptseg synth --out DIR` or point at a real checkpoint",
        )
    missing = [n for n in needed if not (directory / n).exists()]
    if not safetensors_files(directory):
        missing.append("model.safetensors (or a sharded index)")
    if missing:
        raise UsageError(
            field, f"{directory} lacks {', '.join(missing)}: not a {kind} checkpoint"
        )


def check_weights(weights: Path) -> tuple[Path, Path]:
    """``(weights/mllm, weights/sam3)`` after checking both are checkpoints of the right kind."""
    weights = Path(weights)
    if not weights.is_dir():
        raise UsageError(
            "--weights",
            f"{weights} is not a directory; create one with "
            f"`conceptseg synth --out {weights}` or point at real checkpoints",
        )
    mllm, sam3 = weights / "mllm", weights / "sam3"
    check_checkpoint_dir(
        mllm, "mllm", ("config.json", "tokenizer_config.json", "preprocessor_config.json")
    )
    check_checkpoint_dir(sam3, "sam3", ("config.json", "vocab.json", "merges.txt"))
    for directory, kind in ((mllm, "qwen2_5_vl"), (sam3, "sam3")):
        found = json.loads((directory / "config.json").read_text()).get("model_type")
        if found != kind:
            raise UsageError(
                f"--weights ({directory.name})",
                f"{directory}/config.json has model_type {found!r}, expected {kind!r}",
            )
    return mllm, sam3


def sha256_files(paths: list[Path]) -> str:
    """One sha256 over the bytes of ``paths`` in order (a checkpoint's shards; what the engine
    manifests record as ``source_sha256``)."""
    digest = hashlib.sha256()
    for path in paths:
        with open(path, "rb") as fh:
            hashlib.file_digest(fh, lambda: digest)  # one running digest over every file
    return digest.hexdigest()
