"""Smoke test of ``conceptseg bench sam3`` on the tiny checkpoints: every contender of every step
has its row, OpenVINO's among them, with quality against torch fp32 in the same row (fp32
engines within 1e-5 relative L2, bf16 ones within 2 %); the JSON record is the last line. Not
speed.

Run: .venv/bin/pytest tests/models/test_bench_sam3.py -q
"""

from __future__ import annotations

import contextlib
import io
import json

from conceptseg.cli import main


def test_rows_for_every_contender_with_quality(tiny_weights, tiny_engines):
    argv = ["bench", "sam3", "--weights", str(tiny_weights), "--engines", str(tiny_engines),
            "--repeats", "1", "--warmup", "0", "--threads", "2"]  # fmt: skip
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        assert main(argv) == 0
    record = json.loads(stdout.getvalue().strip().splitlines()[-1])
    assert record["target"] == "sam3" and "openvino" in record["versions"]
    rows = {(r["step"], r["contender"]): r for r in record["rows"]}
    assert set(rows) == {
        ("vision", c) for c in ("torch_eager_fp32", "torch_bf16", "ort_fp32", "ov_fp32", "ov_bf16")
    } | {(s, c) for s in ("heads", "text") for c in ("torch_eager_fp32", "ort_fp32", "ov_fp32")}
    for key in (("vision", "ort_fp32"), ("vision", "ov_fp32")):
        assert rows[key]["rel_l2"] < 1e-5 and rows[key]["mask_iou"] == 1.0, key
    for key in (("vision", "torch_bf16"), ("vision", "ov_bf16")):
        assert 1e-5 < rows[key]["rel_l2"] < 0.02, key
    for step in ("heads", "text"):
        assert rows[step, "ov_fp32"]["max_abs"] < 1e-4 and rows[step, "ov_fp32"]["p50_ms"] > 0
