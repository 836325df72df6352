"""``conceptseg eval`` on generated datasets in each layout (tiny synthetic checkpoints): the
report's metrics recomputed independently from the saved masks, resume, compare, a corrupt
file counted and not fatal, bad arguments ending in one line.

Run: .venv/bin/pytest tests/models/test_eval_cli.py -q
"""

import json
import shutil

import numpy as np
import pytest
from PIL import Image

from conceptseg import datasets, metrics
from conceptseg.cli import main
from conceptseg.dataset_synth import write_dataset

FAST = ["--preset", "test", "--max-new-tokens", "8"]


@pytest.fixture(scope="module")
def roots(tmp_path_factory):
    base = tmp_path_factory.mktemp("evaldata")
    return {layout: write_dataset(base / layout, layout, n=2) for layout in datasets.LAYOUTS}


def _eval(weights, root, tmp, name, *extra):
    out, save = tmp / f"{name}.json", tmp / name
    argv = ["eval", "--weights", str(weights), "--dataset", str(root), "--out", str(out),
            "--save-masks", str(save), *FAST, *extra]  # fmt: skip
    assert main(argv) == 0
    return json.loads(out.read_text()), save


def _gt(target, side):
    """The ground truth read without the runner (README 'Evaluation' rules)."""
    if target.gt.suffix == ".json":
        size = Image.open(target.image).size[::-1]
        return datasets.polygons_to_mask(json.loads(target.gt.read_text())["shapes"], size)
    gt = Image.open(target.gt).convert("L")
    if side:
        return np.asarray(gt.resize((side, side), Image.BICUBIC)) > 127
    return np.asarray(gt) > 0


def _recomputed(report, root, save):
    side = report["metric_size"]
    targets = {(t.subset, t.id): t for t in datasets.read(root).targets}
    pairs = []
    for record in report["targets"]:
        target = targets[record["subset"], record["id"]]
        pred = Image.open(save / record["subset"] / f"{record['id']}.png")
        assert pred.size == Image.open(target.image).size  # saved at the target's own size
        if side:
            pred = pred.resize((side, side), Image.NEAREST)
        gt = _gt(target, side)
        ignore = gt == 255 if gt.dtype == np.uint8 else None
        pairs.append((np.asarray(pred) > 127, gt == 1 if ignore is not None else gt, ignore))
    return metrics.evaluate(pairs)


@pytest.mark.parametrize("layout", datasets.LAYOUTS)
def test_each_layout_scores_what_it_saved(layout, tiny_weights, roots, tmp_path, capsys):
    report, save = _eval(tiny_weights, roots[layout], tmp_path, "run")
    stdout = capsys.readouterr().out
    assert "| subset | n | mIoU | gIoU | cIoU | wF | Sm | MAE | BER | mDice | fast |" in stdout
    assert "synthetic" in stdout and report["weights"]["synthetic"]
    expected = {"conceptseg": (5, 1), "reasonseg": (2, 0), "plain": (2, 0)}[layout]
    assert (report["counts"]["scored"], report["counts"]["problems"]) == expected, report[
        "problems"
    ]
    got = report["tables"]["all"]
    for key, value in _recomputed(report, roots[layout], save).items():
        assert got[key] == pytest.approx(value, abs=1e-12), key
    assert report["metric_size"] == (600 if layout == "conceptseg" else 0)
    assert set(report["latency_ms"]) == {r["route"] for r in report["targets"]}
    assert len(report["weights"]["sha256"]["mllm"]) == 64


def test_resume_runs_nothing_and_compare_lists_the_worst(tiny_weights, roots, tmp_path, capsys):
    first, save = _eval(tiny_weights, roots["plain"], tmp_path, "a", "--no-router")
    assert {r["route"] for r in first["targets"]} == {"reason"}
    other = shutil.copytree(save, tmp_path / "b")
    flipped = other / "plain" / "t1.png"
    Image.fromarray(255 - np.asarray(Image.open(flipped))).save(flipped)
    # every mask is saved: no model is loaded, nothing is run
    again, _ = _eval(
        tiny_weights, roots["plain"], tmp_path, "a", "--resume", "--compare", str(other)
    )
    assert again["counts"]["resumed"] == again["counts"]["scored"] == 2
    assert again["tables"] == first["tables"]
    compare = again["compare"]
    assert compare["n"] == 2 and compare["identical"] == 1 and compare["worst"][0]["id"] == "t1"
    assert compare["worst"][0]["iou"] < 1 and "compare with" in capsys.readouterr().out


def test_a_corrupt_file_is_counted_not_fatal(tiny_weights, roots, tmp_path):
    root = shutil.copytree(roots["plain"], tmp_path / "plain")
    (root / "images" / "t0.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    report, save = _eval(tiny_weights, root, tmp_path, "run")
    assert report["counts"] == {"targets": 2, "scored": 1, "resumed": 0, "problems": 1}
    assert report["problems"][0]["file"].endswith("t0.png") and not (save / "plain/t0.png").exists()


@pytest.mark.parametrize(
    "extra, expected",
    [
        (["--concurrency", "2"], "error: --concurrency: in-process runs one target at a time"),
        (["--subset", "nope"], "error: --subset: ['nope'] not in"),
        (["--weights", ""], "error: --weights: give the checkpoints directory, or --url"),
        (["--metric-size", "-5"], "error: --metric-size:"),
    ],
)
def test_bad_arguments(tiny_weights, roots, tmp_path, capsys, extra, expected):
    argv = ["eval", "--weights", str(tiny_weights), "--dataset", str(roots["plain"]),
            "--out", str(tmp_path / "r.json"), "--save-masks", str(tmp_path / "m"), *extra]  # fmt: skip
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(expected) and err.count("\n") == 1, err
