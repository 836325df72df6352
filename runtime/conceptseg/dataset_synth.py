"""Tiny evaluation datasets drawn in code, one per layout of ``conceptseg.datasets`` (tests, the
README's sample table). Images are 64x48 scenes with one coloured shape, the shape is the mask.

    write_dataset(Path("data/tiny-benchmark"), "conceptseg")   # or "reasonseg", "plain"

``conceptseg``: subsets ``rare`` (class-named question), ``Polyp`` (fixed question) and
``MIG_common_object`` (one reference image, no mask; plus one three-image item the runtime cannot
express, reported as a problem). ``reasonseg``: ``val/`` with polygon JSON, an ``ignore`` region.
``plain``: ``images/``, ``masks/``, ``prompts.csv`` with mask and box references.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

SIZE = (64, 48)  # (W, H)
COLORS = [(200, 40, 40), (40, 160, 60), (40, 80, 200), (220, 180, 30), (150, 60, 160)]


def draw_scene(seed: int, size: tuple[int, int] = SIZE) -> tuple[Image.Image, np.ndarray, list]:
    """(RGB image, bool mask (H, W), polygon points [[x, y], ...]) of one random shape."""
    rng = np.random.default_rng(seed)
    w, h = size
    noise = rng.integers(90, 140, (h, w, 3), dtype=np.uint8)
    image = Image.fromarray(noise, "RGB")
    x1, y1 = int(rng.integers(2, w // 2)), int(rng.integers(2, h // 2))
    x2, y2 = int(x1 + rng.integers(8, w // 2)), int(y1 + rng.integers(6, h // 2))
    if seed % 2:
        points = [[x1, y1], [x2, y1], [x2, y2], [x1, y2]]
    else:
        points = [[x1, y2], [(x1 + x2) // 2, y1], [x2, y2]]
    mask_image = Image.new("L", size)
    ImageDraw.Draw(mask_image).polygon([tuple(p) for p in points], fill=255, outline=255)
    color = COLORS[seed % len(COLORS)]
    ImageDraw.Draw(image).polygon([tuple(p) for p in points], fill=color, outline=color)
    return image, np.asarray(mask_image) > 0, points


def _save(root: Path, rel: str, image: Image.Image) -> str:
    (root / rel).parent.mkdir(parents=True, exist_ok=True)
    image.save(root / rel)
    return rel


def _mask_image(mask: np.ndarray) -> Image.Image:
    return Image.fromarray(mask.astype(np.uint8) * 255, "L")


def _item(root: Path, subset: str, cls: str, name: str, seed: int) -> dict:
    image, mask, _ = draw_scene(seed)
    return {
        "img_path": [_save(root, f"{subset}/images/{name}.png", image)],
        "mask_path": _save(root, f"{subset}/masks/{name}.png", _mask_image(mask)),
        "task_name": subset,
        "cls_name": cls,
        "dataset_name": subset,
    }


def _mig_item(root: Path, n_images: int, name: str, seed: int) -> dict:
    subset = "MIG_common_object"
    paths = [
        _save(root, f"{subset}/images/{name}_{i}.png", draw_scene(seed + i)[0])
        for i in range(n_images)
    ]
    mask = draw_scene(seed + n_images - 1)[1]
    return {
        "img_path": paths,
        "mask_path": _save(root, f"{subset}/masks/{name}.png", _mask_image(mask)),
        "task_name": subset,
        "cls_name": f"{subset}_{name}",
        "dataset_name": subset,
        "problem": "the object shared by both images",
    }


def write_conceptseg(root: Path, n: int = 2) -> Path:
    train: dict[str, list] = {}
    test: dict[str, list] = {}
    for k, (subset, cls) in enumerate([("rare", "rare_red_box"), ("Polyp", "Polyp_polyp")]):
        train[cls] = [_item(root, subset, cls, f"train{i}", 100 * k + i) for i in range(3)]
        test[cls] = [_item(root, subset, cls, f"test{i}", 100 * k + 50 + i) for i in range(n)]
    test["MIG"] = [_mig_item(root, 2, "pair0", 300), _mig_item(root, 3, "triple0", 310)]
    (root / "all_meta.json").write_text(json.dumps({"train": train, "test": test}, indent=1))
    return root


def write_reasonseg(root: Path, n: int = 3) -> Path:
    folder = root / "val"
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        image, _, points = draw_scene(200 + i)
        image.save(folder / f"img{i}.jpg", quality=95)
        shapes = [{"label": "target", "points": points, "shape_type": "polygon"}]
        if i == 0:  # a small ignore region in a corner
            shapes.append({"label": "ignore", "points": [[0, 0], [6, 0], [6, 6], [0, 6]]})
        anno = {"text": [f"the thing a person would point at ({i})"], "is_sentence": True,
                "shapes": shapes}  # fmt: skip
        (folder / f"img{i}.json").write_text(json.dumps(anno))
    return root


def write_plain(root: Path, n: int = 3) -> Path:
    rows = []
    ref_image, ref_mask, points = draw_scene(400)
    ref = _save(root, "images/ref0.png", ref_image)
    ref_m = _save(root, "masks/ref0.png", _mask_image(ref_mask))
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    box = f"{min(xs)},{min(ys)},{max(xs) + 1},{max(ys) + 1}"
    for i in range(n):
        image, mask, _ = draw_scene(410 + i)
        refs = [f"{ref}:{ref_m}", f"{ref}:{box}"][: i % 3]  # 0, 1 or 2 references
        rows.append({
            "id": f"t{i}",
            "image": _save(root, f"images/t{i}.png", image),
            "mask": _save(root, f"masks/t{i}.png", _mask_image(mask)),
            "prompt": ["red box", "the shape", "the coloured shape in the middle of it"][i % 3],
            "references": ";".join(refs),
        })  # fmt: skip
    with open(root / "prompts.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return root


def write_dataset(root: Path, layout: str, n: int = 3) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    writers = {"conceptseg": write_conceptseg, "reasonseg": write_reasonseg, "plain": write_plain}
    return writers[layout](root, n)
