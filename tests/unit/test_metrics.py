"""``conceptseg.metrics`` against ``pysodmetrics`` on random masks and the corners, and the named
places where the paper's toolkit differs from it.

Run: .venv/bin/pytest tests/unit/test_metrics.py -q
"""

import numpy as np
import pytest

from conceptseg import metrics

sod = pytest.importorskip("py_sod_metrics")
from py_sod_metrics import sod_metrics  # noqa: E402

TOL = 1e-6


def _blobs(rng, shape, n):
    """Rectangles and ellipses, like real masks (plus a little noise)."""
    h, w = shape
    yy, xx = np.mgrid[:h, :w]
    mask = np.zeros(shape, bool)
    for _ in range(n):
        cy, cx = rng.integers(0, h), rng.integers(0, w)
        ry, rx = rng.integers(1, max(2, h // 3)), rng.integers(1, max(2, w // 3))
        if rng.random() < 0.5:
            mask |= ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1
        else:
            mask[max(cy - ry, 0) : cy + ry, max(cx - rx, 0) : cx + rx] = True
    return mask ^ (rng.random(shape) < 0.01)


def _random_pairs(seed=0, count=12, shape=(48, 64)):
    rng = np.random.default_rng(seed)
    return [(_blobs(rng, shape, 3), _blobs(rng, shape, 2)) for _ in range(count)]


def _corners():
    z, o = np.zeros((6, 7), bool), np.ones((6, 7), bool)
    px = z.copy()
    px[2, 3] = True
    line_gt, line_p = np.zeros((1, 9), bool), np.zeros((1, 9), bool)
    line_gt[0, 2:5], line_p[0, 3:7] = True, True
    return {
        "empty_gt": (px, z),
        "empty_pred": (z, px),
        "both_empty": (z, z),
        "full": (o, o),
        "full_gt": (px, o),
        "full_pred": (o, px),
        "single_pixel": (px, px),
        "1xN": (line_p, line_gt),
    }


def _sod(metric, pred, gt):
    metric.step(pred.astype(np.float64), gt.astype(bool), normalize=False)
    return metric.get_results()


def _handler(name, pred, gt, **kw):
    handler = getattr(sod, name)(with_dynamic=False, with_adaptive=False, with_binary=True, **kw)
    fm = sod.FmeasureV2({"m": handler})
    return float(_sod(fm, pred, gt)["m"]["binary"])


class _ToolkitSm(sod.Smeasure):
    """pysodmetrics' S-measure with the toolkit's estimators: population std/var, covariance
    over N - 1, eps 1e-8, no clipping at 0. Test-only, to show that this is the one difference."""

    def s_object(self, x):
        return 2 * np.mean(x) / (np.mean(x) ** 2 + 1 + np.std(x) + 1e-8)

    def cal_sm(self, pred, gt):
        y = np.mean(gt)
        if y in (0, 1):
            return super().cal_sm(pred, gt)
        return self.object(pred, gt) * self.alpha + self.region(pred, gt) * (1 - self.alpha)

    def ssim(self, pred, gt):
        n, x, y = pred.size, np.mean(pred), np.mean(gt)
        sxy = np.sum((pred - x) * (gt - y)) / (n - 1)
        alpha, beta = 4 * x * y * sxy, (x * x + y * y) * (np.var(pred) + np.var(gt))
        return alpha / (beta + 1e-8) if alpha != 0 else (1.0 if beta == 0 else 0.0)


@pytest.mark.parametrize("pred, gt", _random_pairs() + list(_corners().values()))
def test_mae_and_ber_equal_pysodmetrics(pred, gt):
    got = metrics.per_image(pred, gt)
    assert got["MAE"] == pytest.approx(_sod(sod.MAE(), pred, gt)["mae"], abs=TOL)
    assert got["BER"] == pytest.approx(_handler("BERHandler", pred, gt), abs=TOL)


@pytest.mark.parametrize("pred, gt", _random_pairs(1))
def test_ious_and_dice_equal_pysodmetrics_on_nonempty_masks(pred, gt):
    got = metrics.per_image(pred, gt)
    fg, bg = _handler("IOUHandler", pred, gt), _handler("IOUHandler", ~pred, ~gt)
    assert got["mIoU"] == pytest.approx((fg + bg) / 2, abs=TOL)
    assert got["gIoU"] == pytest.approx(fg, abs=TOL)
    assert got["mDice"] == pytest.approx(_handler("DICEHandler", pred, gt), abs=TOL)


def test_ciou_equals_pysodmetrics_dataset_iou():
    pairs = _random_pairs(2)
    handler = sod.IOUHandler(False, False, with_binary=True, sample_based=False)
    fm = sod.FmeasureV2({"iou": handler})
    for pred, gt in pairs:
        fm.step(pred.astype(np.float64), gt, normalize=False)
    assert metrics.evaluate(pairs)["cIoU"] == pytest.approx(
        float(fm.get_results()["iou"]["binary"]), abs=TOL
    )


@pytest.mark.parametrize("pred, gt", _random_pairs(3) + list(_corners().values()))
def test_wf_equals_pysodmetrics_with_the_toolkits_eps(pred, gt, monkeypatch):
    monkeypatch.setattr(sod_metrics, "EPS", 1e-6)  # the toolkit's eps, in P and Q
    expected = _sod(sod.WeightedFmeasure(), pred, gt)["wfm"]
    assert metrics.per_image(pred, gt)["wF"] == pytest.approx(expected, abs=1e-9)


def test_wf_differs_from_pysodmetrics_only_by_eps():
    """Toolkit eps 1e-6 vs pysodmetrics' 2.2e-16: below 1e-5, never zero."""
    diffs = [
        abs(metrics.per_image(p, g)["wF"] - _sod(sod.WeightedFmeasure(), p, g)["wfm"])
        for p, g in _random_pairs(4)
    ]
    assert 0 < max(diffs) < 1e-5, diffs


@pytest.mark.parametrize("pred, gt", _random_pairs(5) + [_corners()[k] for k in ("empty_gt",
                         "empty_pred", "both_empty", "full", "full_gt", "full_pred")])  # fmt: skip
def test_sm_equals_pysodmetrics_with_the_toolkits_variances(pred, gt):
    expected = _sod(_ToolkitSm(), pred, gt)["sm"]
    assert metrics.per_image(pred, gt)["Sm"] == pytest.approx(expected, abs=1e-9)


def test_sm_differs_from_pysodmetrics_variances():
    """The toolkit uses ddof=0 (np.std, np.var), pysodmetrics ddof=1: a small, nonzero gap."""
    diffs = [
        abs(metrics.per_image(p, g)["Sm"] - _sod(sod.Smeasure(), p, g)["sm"])
        for p, g in _random_pairs(6)
    ]
    assert 0 < max(diffs) < 2e-2, diffs


def test_sm_zero_area_quadrant_is_finite_where_both_references_give_nan():
    pred, gt = _corners()["1xN"]
    with np.errstate(all="ignore"), pytest.warns(RuntimeWarning):
        assert np.isnan(_sod(sod.Smeasure(), pred, gt)["sm"])
    assert np.isfinite(metrics.per_image(pred, gt)["Sm"])


def test_empty_masks_score_one_for_iou_and_dice_where_pysodmetrics_gives_zero():
    z = np.zeros((4, 5), bool)
    got = metrics.per_image(z, z)
    assert got["gIoU"] == got["mIoU"] == got["mDice"] == 1.0
    assert _handler("IOUHandler", z, z) == _handler("DICEHandler", z, z) == 0.0
    assert got["wF"] == 0.0 and got["Sm"] == 1.0 and got["MAE"] == 0.0
    assert got["BER"] == pytest.approx(0.5)  # TP / (0 + 1e-8) = 0: empty GT never scores 0


@pytest.mark.parametrize(
    "name, expected",
    [
        ("empty_gt", {"gIoU": 0.0, "mDice": 1e-5 / (1 + 1e-5), "wF": 0.0, "MAE": 1 / 42}),
        ("empty_pred", {"gIoU": 0.0, "mDice": 1e-5 / (1 + 1e-5), "BER": 0.5}),
        ("full", {"gIoU": 42 / (42 + 1e-5), "mIoU": 1.0, "Sm": 1.0, "BER": 0.5, "MAE": 0.0}),
        ("single_pixel", {"gIoU": 1 / (1 + 1e-5), "mIoU": 1.0, "mDice": 1.0, "BER": 0.0}),
        ("1xN", {"gIoU": 2 / (5 + 1e-5), "MAE": 3 / 9}),
    ],
)
def test_corner_values(name, expected):
    got = metrics.per_image(*_corners()[name])
    for key, value in expected.items():
        assert got[key] == pytest.approx(value, abs=TOL), key


def test_ignore_pixels_count_for_neither_iou_term():
    gt, pred, ignore = np.zeros((4, 4), bool), np.zeros((4, 4), bool), np.zeros((4, 4), bool)
    gt[:2], pred[:3], ignore[2] = True, True, True  # the extra predicted row is ignored
    assert metrics.per_image(pred, gt, ignore)["gIoU"] == pytest.approx(8 / (8 + 1e-5))
    assert metrics.per_image(pred, gt)["gIoU"] == pytest.approx(8 / 12, abs=TOL)


def test_evaluate_keys_uint8_input_and_means():
    pairs = _random_pairs(7, count=3)
    as_u8 = [(p.astype(np.uint8) * 255, g.astype(np.uint8)) for p, g in pairs]
    got = metrics.evaluate(as_u8)
    assert list(got) == list(metrics.KEYS)
    assert got == metrics.evaluate(pairs)
    one = [metrics.per_image(p, g) for p, g in pairs]
    assert got["mIoU"] == pytest.approx(np.mean([r["mIoU"] for r in one]))
    assert all(np.isnan(v) for v in metrics.evaluate([]).values())
