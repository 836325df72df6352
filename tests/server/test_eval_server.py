"""``conceptseg eval --url`` against the real server equals the in-process run on the same engines
and config: the same masks (reference masks sent as the boxes that give the same mosaic), the
same scores, several requests in flight.

Run: .venv/bin/pytest tests/server/test_eval_server.py -q
"""

import json

import pytest

from conceptseg.cli import main
from conceptseg.dataset_synth import write_dataset

MAX_NEW_TOKENS = "8"  # the server's config (tests/server/conftest.py CONFIG)


@pytest.mark.parametrize(
    "layout, extra",
    [("conceptseg", ["--no-router", "--subset", "rare", "--subset", "MIG_common_object"]),
     ("plain", [])],
)  # fmt: skip
def test_url_equals_in_process(triton, tiny_weights, tiny_engines, tmp_path, layout, extra):
    root = write_dataset(tmp_path / layout, layout, n=2)
    common = ["eval", "--dataset", str(root), *extra]
    local = ["--weights", str(tiny_weights), "--backend", "onnxruntime", "--engines",
             str(tiny_engines), "--preset", "test", "--max-new-tokens", MAX_NEW_TOKENS]  # fmt: skip
    assert main([*common, *local, "--out", str(tmp_path / "local.json"),
                 "--save-masks", str(tmp_path / "local")]) == 0  # fmt: skip
    served = ["--url", triton.cfg.urls["grpc"], "--protocol", "grpc", "--concurrency", "2", "--compare",
              str(tmp_path / "local")]  # fmt: skip
    assert main([*common, *served, "--out", str(tmp_path / "served.json"),
                 "--save-masks", str(tmp_path / "served")]) == 0  # fmt: skip
    here = json.loads((tmp_path / "local.json").read_text())
    there = json.loads((tmp_path / "served.json").read_text())
    n = here["counts"]["scored"]
    assert n == there["counts"]["scored"] >= 2
    assert there["compare"]["identical"] == there["compare"]["n"] == n, there["compare"]["worst"]
    assert there["tables"] == here["tables"]
    routes = [(r["id"], r["route"]) for r in here["targets"]]
    assert routes == [(r["id"], r["route"]) for r in there["targets"]]
    assert there["backend"]["url"] and there["weights"]["synthetic"]
