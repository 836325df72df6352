"""The benchmark harness's pure parts (``conceptseg.benchmark``): statistics, alternation,
speed-ups against the step's baseline, the markdown table, the machine record.

Run: .venv/bin/pytest tests/unit/test_benchmark.py -q
"""

from __future__ import annotations

import pytest

from conceptseg import benchmark as b


def test_summary_percentiles():
    stats = b.summary([float(v) for v in range(1, 101)])
    assert stats["p50_ms"] == stats["median_ms"] == pytest.approx(50.5)
    assert stats["p90_ms"] == pytest.approx(90.1) and stats["p99_ms"] == pytest.approx(99.01)
    assert stats["min_ms"] == 1 and stats["repeats"] == 100
    one = b.summary([7.0])
    assert one["p50_ms"] == one["p90_ms"] == one["p99_ms"] == 7.0


def test_side_by_side_rotates_the_order_and_warms_up():
    calls: list[str] = []
    contenders = {n: (lambda n=n: calls.append(n) or n) for n in "abc"}
    result = b.side_by_side(contenders, repeats=3, warmup=1, runner=b.identity_runner)
    assert calls == list("abc") + list("abc") + list("bca") + list("cab")
    assert {k: len(v) for k, v in result["times"].items()} == {"a": 3, "b": 3, "c": 3}
    assert result["outputs"] == {"a": "a", "b": "b", "c": "c"}


def test_speedups_are_against_the_first_row_of_each_step():
    rows = b.with_speedups([
        b.row("vision", "torch_fp32", {"p50_ms": 100.0}),
        b.row("vision", "torch_bf16", {"p50_ms": 25.0}, rel_l2=0.008),
        b.row("heads", "torch_fp32", {"p50_ms": 10.0}),
        {"step": "fast", "contender": "served", "concurrency": 2, "p50_ms": 5.0},
    ])  # fmt: skip
    assert [r.get("speedup") for r in rows] == [1.0, 4.0, 1.0, None]


def test_markdown_table_has_a_column_per_field_and_marks_a_failed_check():
    rows = [b.row("request", "reference_recipe", {"p50_ms": 2000.0, "p90_ms": 2100.0},
                  same_answer=True, mask_iou=1.0),
            b.row("request", "ours", {"p50_ms": 800.0, "p90_ms": 900.0}, same_answer=False,
                  mask_iou=0.5, breakdown_ms={"mllm": 1.0})]  # fmt: skip
    lines = b.markdown_table(b.with_speedups(rows)).splitlines()
    assert lines[0] == "| step | contender | p50_ms | p90_ms | speedup | mask_iou | same_answer |"
    assert lines[1].startswith("| --- | --- | ---: |")
    assert lines[3] == "| request | ours | 800 | 900 | 2.5 | 0.5 | **no** |"


def test_machine_names_the_cpu_flags_that_pick_fast_paths():
    info = b.machine()
    assert info["cores"] >= 1 and info["memory_gib"] > 0
    assert set(info["cpu_flags"]) == set(b.CPU_FLAGS)
    assert b.versions()["conceptseg"] and b.versions()["python"]
