"""Shared fixtures: tiny synthetic checkpoints, written once per test session; plan records."""

from __future__ import annotations

import json
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def tiny_weights(tmp_path_factory) -> Path:
    from conceptseg.checkpoints import synth

    return synth(tmp_path_factory.mktemp("weights") / "tiny", "tiny", seed=0)


@pytest.fixture(scope="session")
def lively_mllm(tiny_weights, tmp_path_factory) -> Path:
    """The tiny MLLM with its text decoder's matrices scaled x8: seed-0 random weights echo the
    prompt's last token forever, which would make token comparisons vacuous; scaled, the
    completion varies."""
    import shutil

    from safetensors.torch import load_file, save_file

    out = tmp_path_factory.mktemp("lively") / "mllm"
    shutil.copytree(tiny_weights / "mllm", out)
    tensors = load_file(out / "model.safetensors")
    scaled = {k: v * 8 if k.startswith("model.layers.") and v.ndim == 2 else v
              for k, v in tensors.items()}  # fmt: skip
    save_file(scaled, out / "model.safetensors", metadata={"format": "pt"})
    return out


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


def write_plan_records(engines: Path, plans: Path, graphs) -> None:
    """``<graph>.plan.json`` (+ an empty ``.plan``) for ``graphs`` as ``conceptseg build-engines``
    records them from the engine manifests: dynamic dims -1, TensorRT dtypes, the profiles it
    would build. For repository tests on machines without a GPU."""
    from conceptseg_export.trt_build import profiles_for

    dtypes = {"float32": "FLOAT", "int64": "INT64"}
    plans.mkdir(exist_ok=True)
    for name in graphs:
        manifest = json.loads((engines / f"{name}.json").read_text())
        io = {
            kind: [
                {
                    "name": t["name"],
                    "shape": [-1 if isinstance(d, str) else d for d in t["shape"]],
                    "dtype": dtypes[t["dtype"]],
                }
                for t in manifest[kind]
            ]
            for kind in ("inputs", "outputs")
        }
        profiles = [{"index": i, **p.to_json()} for i, p in enumerate(profiles_for(name, manifest))]
        from conceptseg import gpu_stack

        record = {"graph": name, **io, "profiles": profiles,
                  "tensorrt_version": gpu_stack.load()["tensorrt"]}  # fmt: skip
        (plans / f"{name}.plan.json").write_text(json.dumps(record))
        (plans / f"{name}.plan").write_bytes(b"")


@pytest.fixture(scope="session")
def plan_records():
    """:func:`write_plan_records`, for tests in any directory."""
    return write_plan_records
