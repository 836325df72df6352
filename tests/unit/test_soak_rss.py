"""benchmarks/soak.py's RSS figures: medians over the first and last windows, per process."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import soak  # noqa: E402

MB = 2**20


def test_growth_compares_window_medians_not_single_samples():
    # one spike in each window (a request's arrays) does not move the median
    rss = [100, 100, 180, 100, 100, 100, 100, 100, 190, 100]
    samples = [(float(t), {"conceptseg_0_0": v * MB}) for t, v in enumerate(rss)]
    out = soak.rss_growth(samples, window=3)
    assert out["conceptseg_0_0"] == {
        "first_mb": 100.0, "last_mb": 100.0, "growth_pct": 0.0, "peak_mb": 190.0
    }  # fmt: skip


def test_growth_sees_a_steady_climb():
    samples = [(float(t), {"stub": (100 + 5 * t) * MB}) for t in range(10)]
    out = soak.rss_growth(samples, window=2)
    assert out["stub"]["first_mb"] == 105.0 and out["stub"]["last_mb"] == 140.0
    assert out["stub"]["growth_pct"] == round(100 * 35 / 105, 2)


def test_a_process_missing_from_a_window_is_left_out():
    # a stub killed and restarted: no samples of it in the first window under this name
    samples = [(0.0, {"a": MB}), (1.0, {"a": MB}), (5.0, {"a": MB, "b": 2 * MB})]
    assert set(soak.rss_growth(samples, window=1)) == {"a"}
