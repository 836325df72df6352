"""Dataset readers on generated datasets in each layout: what the reference reads, seeded
reference draws, LISA polygons, and bad files reported rather than raised.

Run: .venv/bin/pytest tests/unit/test_datasets.py -q
"""

import json
import random

import numpy as np
import pytest
from PIL import Image

from conceptseg import datasets
from conceptseg.dataset_synth import draw_scene, write_dataset
from conceptseg.evaluate import served_references
from conceptseg.mosaic import build_mosaic
from conceptseg.types import Reference, RequestError


@pytest.fixture(scope="module")
def roots(tmp_path_factory):
    base = tmp_path_factory.mktemp("data")
    return {layout: write_dataset(base / layout, layout) for layout in datasets.LAYOUTS}


def test_layouts_are_detected_and_read(roots):
    counts = {"conceptseg": 7, "reasonseg": 3, "plain": 3}
    for layout, root in roots.items():
        data = datasets.read(root)
        assert data.layout == layout and len(data.targets) == counts[layout], data.problems
        assert data.metric_size == (600 if layout == "conceptseg" else 0)
        for target in data.targets:
            request = datasets.load_request(target)
            gt, _ = datasets.load_ground_truth(target, request.image.size, data.metric_size)
            assert gt.any() and len({t.id for t in data.targets}) == len(data.targets)


def test_benchmark_questions_and_the_unexpressible_mig_item(roots):
    data = datasets.read(roots["conceptseg"])
    questions = {t.subset: t.question for t in data.targets}
    assert questions == {
        "rare": " red box",  # the class name without the dataset's, as the reference (unstripped)
        "Polyp": "polyp colon segmentation",
        "MIG_common_object": "the object shared by both images",
    }
    (mig,) = [t for t in data.targets if t.subset == "MIG_common_object"]
    assert len(mig.references) == 1 and mig.references[0].mask is None
    (problem,) = data.problems
    assert "triple0" in problem.file and "2 references without boxes" in problem.reason


def test_reference_draws_follow_the_reference_and_repeat(roots):
    root = roots["conceptseg"]
    meta = json.loads((root / "all_meta.json").read_text())
    pool = meta["train"]["rare_red_box"]
    rng, expected = random.Random(42), []
    for item in meta["test"]["rare_red_box"]:  # 3 train items: 4 draws each, in file order
        refs = []
        for _ in range(4):
            ref = rng.choice(pool)
            while ref["img_path"][0] == item["img_path"][0]:
                ref = rng.choice(pool)
            refs.append(str(root / ref["img_path"][0]))
        expected.append(refs)
    got = [[str(r.image) for r in t.references] for t in datasets.read(root, ["rare"]).targets]
    assert got == expected
    again = datasets.read(root, ["Polyp", "rare"]).targets
    assert [[str(r.image) for r in t.references] for t in again if t.subset == "rare"] == got
    other = datasets.read(root, ["rare"], seed=7).targets
    assert [[str(r.image) for r in t.references] for t in other] != got


def test_two_train_items_give_one_reference_and_subsets_match_exactly(tmp_path):
    def item(name, subset, cls):
        Image.new("RGB", (8, 8)).save(tmp_path / f"{name}.png")
        return {"img_path": [f"{name}.png"], "mask_path": f"{name}.png", "cls_name": cls,
                "dataset_name": subset, "task_name": subset}  # fmt: skip

    train = {"ultra_rare_cat": [item("a", "ultra_rare", "ultra_rare_cat"), item("b", "x", "x")],
             "rare_cat": [item("c", "rare", "rare_cat")] * 3}  # fmt: skip
    test = {"u": [item("t", "ultra_rare", "ultra_rare_cat")], "r": [item("s", "rare", "rare_cat")]}
    (tmp_path / "all_meta.json").write_text(json.dumps({"train": train, "test": test}))
    data = datasets.read(tmp_path, ["ultra_rare"])
    assert [t.subset for t in data.targets] == ["ultra_rare"]  # the reference would add rare's
    assert len(data.targets[0].references) == 1 and data.targets[0].question == " cat"


def test_missing_files_are_reported_and_skipped(roots, tmp_path):
    import shutil

    root = shutil.copytree(roots["plain"], tmp_path / "plain")
    (root / "masks" / "t1.png").unlink()
    data = datasets.read(root)
    assert [t.id for t in data.targets] == ["t0", "t2"]
    assert data.problems[0].file.endswith("masks/t1.png") and "missing" in data.problems[0].reason


def test_bad_files_raise_data_errors_naming_them(roots, tmp_path):
    import shutil

    root = shutil.copytree(roots["plain"], tmp_path / "plain")
    (root / "images" / "t0.png").write_bytes(b"not a png")
    Image.new("L", (10, 10)).save(root / "masks" / "t2.png")
    t0, _, t2 = datasets.read(root).targets
    with pytest.raises(datasets.DataError, match="t0.png: unreadable image"):
        datasets.load_request(t0)
    with pytest.raises(datasets.DataError, match="mask is 10x10, image is 64x48"):
        datasets.load_ground_truth(t2, (64, 48))


@pytest.mark.parametrize(
    "subsets, layout, match",
    [(["nope"], None, "--subset: \\['nope'\\] not in"), (None, None, "--dataset: .* has no")],
)
def test_bad_arguments(roots, tmp_path, subsets, layout, match):
    root = roots["plain"] if subsets else tmp_path
    with pytest.raises(RequestError, match=match):
        datasets.read(root, subsets, layout)


def test_plain_json_layout(roots, tmp_path):
    import shutil

    root = shutil.copytree(roots["plain"], tmp_path / "plain")
    (root / "prompts.csv").unlink()
    rows = [{"image": "images/t0.png", "mask": "masks/t0.png", "prompt": "a", "subset": "mine",
             "references": [{"image": "images/ref0.png", "box": [1, 2, 30, 20]},
                            {"image": "images/ref0.png", "mask": "masks/ref0.png"}]},
            {"image": "images/t1.png", "prompt": "no mask column"}]  # fmt: skip
    (root / "prompts.json").write_text(json.dumps(rows))
    data = datasets.read(root)
    (target,) = data.targets
    assert target.subset == "mine" and target.references[0].box == (1.0, 2.0, 30.0, 20.0)
    assert "row 2" in data.problems[0].file and "mask" in data.problems[0].reason
    assert len(datasets.load_request(target).references) == 2


def test_polygons_match_opencv_fill_and_outline():
    """LISA paints with cv2.fillPoly + cv2.polylines; PIL differs on a few edge pixels."""
    cv2 = pytest.importorskip("cv2")
    rng = np.random.default_rng(0)
    differ = area = 0
    for _ in range(30):  # simple (star-shaped) polygons, as annotations are
        n, centre = int(rng.integers(3, 9)), rng.random(2) * [40, 30] + [12, 9]
        angle, radius = np.sort(rng.random(n) * 2 * np.pi), rng.random(n) * 12 + 3
        points = np.stack([centre[0] + radius * np.cos(angle),
                           centre[1] + radius * np.sin(angle)], 1).tolist()  # fmt: skip
        ref = np.zeros((48, 64), np.uint8)
        pts = np.array([points], dtype=np.int32)
        cv2.polylines(ref, pts, True, 1, 1)
        cv2.fillPoly(ref, pts, 1)
        got = datasets.polygons_to_mask([{"label": "t", "points": points}], (48, 64))
        assert np.sum(got != ref) <= 12, np.sum(got != ref)
        differ, area = differ + np.sum(got != ref), area + ref.sum()
    assert differ <= 0.02 * area, (differ, area)


def test_polygon_order_ignore_and_flag():
    big = {"label": "target", "points": [[0, 0], [20, 0], [20, 20], [0, 20]]}
    small = {"label": "ignore_me", "points": [[5, 5], [8, 5], [8, 8], [5, 8]]}
    flag = {"label": "flag", "points": [[0, 0], [30, 0], [30, 30]]}
    mask = datasets.polygons_to_mask([small, flag, big], (32, 32))
    assert mask[6, 6] == 255 and mask[1, 1] == 1 and mask[30, 2] == 0  # small over big


def test_benchmark_ground_truth_is_resized_like_the_reference(roots):
    target = datasets.read(roots["conceptseg"], ["Polyp"]).targets[0]
    gt, _ = datasets.load_ground_truth(target, (64, 48), 600)
    raw = Image.open(target.gt).convert("L").resize((600, 600))  # PIL's default filter
    assert np.array_equal(gt, np.asarray(raw) > 127)


@pytest.mark.parametrize("n", [1, 2, 4])
def test_served_boxes_give_the_mosaic_the_masks_give(n):
    refs = []
    for i in range(n):
        image, mask, _ = draw_scene(i, size=(37 + 13 * i, 29 + 7 * i))
        refs.append(Reference(image=image, mask=mask))
    served = [Reference(image=im, box=box) for im, box in served_references(tuple(refs))]
    assert build_mosaic(served).boxes == build_mosaic(refs).boxes
