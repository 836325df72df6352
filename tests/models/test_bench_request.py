"""Smoke test of ``conceptseg bench request`` on the tiny checkpoints: the output's structure
(markdown table, plots, the JSON record as the last stdout line), and that the reference
recipe's row reports the same answer and mask as ours; not speed.

Run: .venv/bin/pytest tests/models/test_bench_request.py -q
"""

from __future__ import annotations

import contextlib
import io
import json

import pytest
from PIL import Image

from conceptseg.cli import main

TOKENS = 4


@pytest.fixture(scope="module")
def output(tiny_weights, tmp_path_factory):
    plots = tmp_path_factory.mktemp("plots")
    argv = ["bench", "request", "--weights", str(tiny_weights), "--repeats", "1", "--warmup", "0",
            "--threads", "2", "--new-tokens", str(TOKENS), "--mllm-precision", "fp32",
            "--plots", str(plots)]  # fmt: skip
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        assert main(argv) == 0
    return stdout.getvalue()


@pytest.fixture(scope="module")
def record(output):
    return json.loads(output.strip().splitlines()[-1])


def test_markdown_table(output):
    lines = [line for line in output.splitlines() if line.startswith("|")]
    assert lines[0].startswith("| step | contender | p50_ms | p90_ms | p99_ms | repeats | speedup |")
    assert set(lines[1].replace("|", "").split()) <= {"---", "---:"}
    assert [line.split("|")[2].strip() for line in lines[2:]] == ["reference_recipe", "ours"]


def test_record_is_the_last_line_with_machine_versions_config_rows(record):
    assert record["target"] == "request" and record["command"].startswith("conceptseg bench request")
    machine = record["machine"]
    assert machine["cores"] >= 1 and machine["cpu"] and "amx_bf16" in machine["cpu_flags"]
    assert {"torch", "transformers", "conceptseg"} <= set(record["versions"])
    assert record["config"]["new_tokens"] == TOKENS and record["config"]["repeats"] == 1
    for row in record["rows"]:
        assert row["step"] == "reasoning request" and row["repeats"] == 1
        assert 0 < row["p50_ms"] <= row["p90_ms"] <= row["p99_ms"]
        assert row["new_tokens"] == TOKENS and row["route"] == "reason"
        assert sum(row["breakdown_ms"].values()) > 0


def test_plots_are_valid_pngs(record):
    names = sorted(p.rsplit("/", 1)[-1] for p in record["plots"])
    assert names == ["request_speed_vs_quality.png", "request_step_breakdown.png"]
    for path in record["plots"]:
        with open(path, "rb") as handle:
            assert handle.read(8) == b"\x89PNG\r\n\x1a\n"
        with Image.open(path) as image:
            image.verify()


def test_reference_recipe_reports_the_same_answer_and_mask(record):
    recipe, ours = record["rows"]
    assert recipe["contender"] == "reference_recipe" and recipe["speedup"] == 1.0
    assert ours["same_answer"] is True and ours["token_agreement"] == 1.0
    assert ours["mask_iou"] >= 0.99, "the CTM's captured keys vs the full re-forward's"
    vs = record["results"]["ours"]["vs_reference_recipe"]
    assert vs["same_tokens"] and vs["same_route"] and vs["speedup"] == pytest.approx(ours["speedup"])


def test_the_recipe_does_the_reference_work_ours_skips(record):
    recipe, ours = (row["breakdown_ms"] for row in record["rows"])
    for step in ("router_probe", "mllm_full_forward", "sam3_image_again"):
        assert step in recipe and step not in ours, step
    assert {"mllm_prefill", "mllm_decode", "ctm", "sam3_segment"} <= set(ours)
