"""Shared fixtures: tiny synthetic checkpoints, written once per test session."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def tiny_weights(tmp_path_factory) -> Path:
    from conceptseg.checkpoints import synth

    return synth(tmp_path_factory.mktemp("weights") / "tiny", "tiny", seed=0)


@pytest.fixture(scope="session")
def tiny_engines(tiny_weights, tmp_path_factory) -> Path:
    """Every part (SAM 3, CTM, MLLM) exported from the tiny checkpoints through the CLI."""
    from conceptseg.cli import main

    out = tmp_path_factory.mktemp("engines") / "tiny"
    argv = [
        "export",
        "--weights",
        str(tiny_weights),
        "--out",
        str(out),
        "--mllm-verify-tokens",
        "0",
    ]
    assert main(argv) == 0
    return out
