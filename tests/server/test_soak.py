"""The short soak and fault runs of ``benchmarks/soak.py`` (``make soak`` / ``make faults`` run
the full ones) on the session's server: mixed load with no failure and bounded RSS growth;
a stub kill, a dropped HTTP request and a client leaving early, with failures only while the
killed model was down and every request after it answered.

Run: .venv/bin/pytest tests/server/test_soak.py -q   (~1-2 min on 2 cores)
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import soak  # noqa: E402


def test_short_soak_loses_nothing_and_rss_stays_flat(triton):
    # 20 s is too short for the 10 % bound of the full soak: the orchestrators' heaps still grow
    # while they warm (+10 % measured), so here a gross leak is what fails
    result = soak.run_soak(triton, duration=20, concurrency=4, warmup=5, max_growth_pct=25)
    assert result["ok"], result
    assert result["routes"]["fast"]["requests"] > 0 and result["routes"]["reason"]["requests"] > 0


def test_short_faults_fail_only_during_the_outage(triton):
    kinds = (("kill", "sam3_text"), ("drop", ""), ("leave", ""))
    result = soak.run_faults(triton, duration=18, concurrency=2, every=6, kinds=kinds)
    assert result["ok"], result
    assert result["kills"] == 1 and result["max_recovery_s"] < 60, result
