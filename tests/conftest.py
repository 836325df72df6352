"""Shared fixtures: tiny synthetic checkpoints, written once per test session."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def tiny_weights(tmp_path_factory) -> Path:
    from conceptseg.checkpoints import synth

    return synth(tmp_path_factory.mktemp("weights") / "tiny", "tiny", seed=0)
