"""Evaluation datasets: three on-disk layouts read into :class:`Target` lists. Pure: json, csv,
random, numpy, PIL.

- ``conceptseg``: the ConceptSeg-Benchmark (``all_meta.json`` at the root, paths relative to it),
  read as the reference's ``evaluate_conceptseg.py`` reads it: ``test`` items of one
  ``dataset_name`` per subset, in file order; a single-image item draws its references from the
  ``train`` items of its class (1 when the class has 2 train items, else 4; ``random.choice`` with
  replacement, redrawn while it is the target itself) with ``random.Random(seed)`` started afresh
  per subset (the reference: one process per subset, ``random.seed(42)``); reference 0 is the
  withheld proxy tile. Multi-image items (MIG-Bench, MGrounding) use ``img_path[:-1]`` without
  boxes: with one such reference the prompt needs none (it fills the canvas), with more the
  runtime cannot express them and the item is reported. The question is the reference's per
  dataset (:data:`QUESTIONS`). Subset names match exactly (the reference tests a substring, so
  its ``ultra_rare`` run also takes ``rare`` items). Scored at 600x600 (:data:`REFERENCE_SIZE`).
- ``reasonseg``: LISA/ReasonSeg JSON (``NAME.json`` beside ``NAME.jpg``: ``text``, ``shapes``
  polygons, ``"ignore"`` labels = pixels scored by no one), the first question; subsets are the
  sub-folders holding such files (or the root). Scored at the image's size.
- ``plain``: ``prompts.csv`` or ``prompts.json`` at the root (README "Evaluation"), masks with
  nonzero = concept. Scored at the image's size.

Nothing here raises on bad data: a missing or unreadable file or a size mismatch becomes a
:class:`Problem` (at reading) or a :class:`DataError` (at loading), which the runner records.
"""

from __future__ import annotations

import csv
import json
import random
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from conceptseg.types import Box, Reference, Request, RequestError

LAYOUTS = ("conceptseg", "reasonseg", "plain")
REFERENCE_SIZE = 600  # the reference scores ConceptSeg targets on 600x600 resizes
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
QUESTIONS = {  # the reference's question per dataset; "{cls}" = the class name
    "CoSOD3k1024": "Common object segmentation",
    "fewshot1000": "Common object segmentation",
    "Shadow_detection": "shadow",
    "transparent1024": "transparent",
    "COD10K1024": "camouflaged object segmentation",
    "DUTS": "salient object segmentation",
    "Breast_Tumor": "breast tumor segmentation",
    "isic2018": "skin melanocytic tumor segmentation",
    "Polyp": "polyp colon segmentation",
    "ESDIDefects": "industrial defect segmentation",
}


@dataclass(frozen=True)
class RefSpec:
    """A reference image and where its concept is: a mask file, a box, or neither (whole image)."""

    image: Path
    mask: Path | None = None
    box: Box | None = None


@dataclass(frozen=True)
class Target:
    """One evaluation request and its ground truth. ``id`` is stable and file-name safe."""

    id: str
    subset: str
    question: str
    image: Path
    gt: Path  # a mask image, or a LISA polygon JSON (``.json``)
    references: tuple[RefSpec, ...] = ()
    gt_threshold: int = 0  # foreground = mask value > threshold (the benchmark: > 127)


@dataclass(frozen=True)
class Problem:
    file: str
    reason: str


class DataError(Exception):
    """A target that cannot be loaded; ``file`` names the culprit."""

    def __init__(self, file: Path | str, reason: str) -> None:
        super().__init__(f"{file}: {reason}")
        self.problem = Problem(str(file), reason)


@dataclass
class Dataset:
    layout: str
    root: Path
    targets: list[Target] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)
    metric_size: int = 0  # square side the masks are scored at; 0 = each image's own size
    available: list[str] = field(default_factory=list)  # every subset the layout holds

    @property
    def subsets(self) -> list[str]:
        return list(dict.fromkeys(t.subset for t in self.targets))


def safe_id(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text.replace("/", "__")).strip("_") or "target"


def detect_layout(root: Path) -> str | None:
    if (root / "all_meta.json").is_file():
        return "conceptseg"
    if (root / "prompts.csv").is_file() or (root / "prompts.json").is_file():
        return "plain"
    return "reasonseg" if _reasonseg_folders(root) else None


def read(root: Path, subsets: list[str] | None = None, layout: str | None = None,
         seed: int = 42) -> Dataset:  # fmt: skip
    """The dataset at ``root`` (layout detected unless given), ``subsets`` only when given."""
    if not root.is_dir():
        raise RequestError("--dataset", f"{root} is not a directory")
    layout = layout or detect_layout(root)
    if layout is None:
        raise RequestError(
            "--dataset",
            f"{root} has no all_meta.json (ConceptSeg-Benchmark), prompts.csv/prompts.json "
            "(plain layout) or LISA *.json annotations (ReasonSeg); see README 'Evaluation'",
        )
    reader = {"conceptseg": _read_conceptseg, "reasonseg": _read_reasonseg, "plain": _read_plain}
    data = reader[layout](root, list(subsets or []), seed)
    unknown = sorted(set(subsets or []) - set(data.available))
    if unknown:
        raise RequestError("--subset", f"{unknown} not in {root}; it has {data.available}")
    return data


# -- ConceptSeg-Benchmark -------------------------------------------------------------------


def question_for(item: dict) -> str:
    """The reference's question: MIG*/MGrounding items carry theirs, the others by dataset."""
    name, cls = item["dataset_name"], item.get("cls_name", "")
    if "MIG" in name or name == "MGrounding":
        return item["problem"]
    # class-named datasets (rare, ultra_rare, coco2014_*, LVIS*, ...): the class without the
    # dataset's name, "_" -> " " (the reference keeps a leading space: "rare_cat" -> " cat")
    return QUESTIONS.get(name) or cls.replace(name, "").replace("_", " ")


def _read_conceptseg(root: Path, subsets: list[str], seed: int) -> Dataset:
    try:
        meta = json.loads((root / "all_meta.json").read_text())
        test, train = meta["test"], meta.get("train", {})
    except (OSError, ValueError, KeyError) as exc:
        raise RequestError("--dataset", f"{root}/all_meta.json: unreadable ({exc})") from None
    items = [item for group in test.values() for item in group]
    available = list(dict.fromkeys(item["dataset_name"] for item in items))
    data = Dataset("conceptseg", root, metric_size=REFERENCE_SIZE, available=available)
    names = [n for n in subsets or available if n in available]
    for name in names:
        rng = random.Random(seed)  # the reference draws afresh per subset run
        for item in items:
            if item["dataset_name"] != name:
                continue
            try:
                _add(data, _conceptseg_target(root, item, train, rng))
            except DataError as exc:
                _add(data, exc)
    return data


def _draw_references(root: Path, item: dict, train: dict, rng: random.Random) -> list[RefSpec]:
    pool = train.get(item["cls_name"], [])
    target = item["img_path"][0]
    if not any(ref["img_path"][0] != target for ref in pool):
        raise DataError(
            item["mask_path"], f"no train item of class {item['cls_name']!r} to refer to"
        )
    refs = []
    for _ in range(1 if len(pool) == 2 else 4):
        ref = rng.choice(pool)
        while ref["img_path"][0] == target:
            ref = rng.choice(pool)
        refs.append(RefSpec(root / ref["img_path"][0], mask=root / ref["mask_path"]))
    return refs


def _conceptseg_target(root: Path, item: dict, train: dict, rng: random.Random) -> Target:
    paths = item["img_path"]
    if len(paths) == 1:
        refs = _draw_references(root, item, train, rng)
    elif len(paths) == 2:
        refs = [RefSpec(root / paths[0])]  # fills the canvas; no box is shown or asked for
    else:
        raise DataError(
            root / paths[-1],
            f"{len(paths) - 1} references without boxes or masks: the runtime's requests need "
            "one per reference when there are several",
        )
    mask = item["mask_path"]
    return Target(
        id=safe_id(str(Path(mask).with_suffix(""))),
        subset=item["dataset_name"],
        question=question_for(item),
        image=root / paths[-1],
        gt=root / mask,
        references=tuple(refs),
        gt_threshold=127,
    )


def _add(data: Dataset, make: Target | DataError) -> None:
    """Keep a target whose files exist; record a problem otherwise."""
    if isinstance(make, DataError):
        data.problems.append(make.problem)
        return
    assert isinstance(make, Target)
    files = [make.image, make.gt] + [f for r in make.references for f in (r.image, r.mask) if f]
    missing = [f for f in files if not f.is_file()]
    if missing:
        data.problems.append(Problem(str(missing[0]), f"missing (target {make.id})"))
    else:
        data.targets.append(make)


# -- ReasonSeg (LISA JSON) ------------------------------------------------------------------


def _reasonseg_folders(root: Path) -> list[Path]:
    folders = [root] + sorted(p for p in root.iterdir() if p.is_dir())
    return [f for f in folders if any(_is_lisa(j) for j in sorted(f.glob("*.json"))[:3])]


def _is_lisa(path: Path) -> bool:
    try:
        return "shapes" in json.loads(path.read_text())
    except (OSError, ValueError, TypeError):
        return False


def _read_reasonseg(root: Path, subsets: list[str], seed: int) -> Dataset:
    folders = _reasonseg_folders(root)
    data = Dataset("reasonseg", root, available=[f.name for f in folders])
    for folder in folders:
        subset = folder.name
        if subsets and subset not in subsets:
            continue
        for js in sorted(folder.glob("*.json")):
            _add(data, _reasonseg_target(js, subset))
    return data


def _reasonseg_target(js: Path, subset: str) -> Target | DataError:
    try:
        anno = json.loads(js.read_bytes().decode("utf-8", errors="replace"))
        text = anno["text"]
        question = text if isinstance(text, str) else text[0]  # LISA's val: the first sentence
    except (OSError, ValueError, KeyError, IndexError, TypeError) as exc:
        return DataError(js, f"unreadable annotation ({exc})")
    images = [js.with_suffix(s) for s in IMAGE_SUFFIXES if js.with_suffix(s).is_file()]
    if not images:
        return DataError(js.with_suffix(".jpg"), "missing (no image beside the annotation)")
    return Target(safe_id(js.stem), subset, question, images[0], js)


def polygons_to_mask(shapes: list[dict], size_hw: tuple[int, int]) -> np.ndarray:
    """LISA's ground truth: uint8 (H, W), 0 background, 1 target, 255 ignore. Polygons are painted
    largest first (so smaller ones win), each filled with its outline; "flag" shapes are skipped."""
    h, w = size_hw
    polys = [s for s in shapes if s.get("label", "").lower() != "flag"]

    def paint(canvas: Image.Image, points: list, value: int) -> None:
        xy = [(int(x), int(y)) for x, y in np.asarray(points, dtype=np.float64).astype(np.int32)]
        if xy:  # OpenCV's fillPoly + polylines(thickness 1), to within a few edge pixels
            draw = ImageDraw.Draw(canvas)
            draw.polygon(xy, fill=value)
            draw.line(xy + xy[:1], fill=value, width=1)

    areas = []
    for shape in polys:
        single = Image.new("L", (w, h))
        paint(single, shape["points"], 1)
        areas.append(int(np.asarray(single).sum()))
    mask = Image.new("L", (w, h))
    for i in np.argsort(areas, kind="stable")[::-1]:
        shape = polys[i]
        paint(mask, shape["points"], 255 if "ignore" in shape["label"].lower() else 1)
    return np.asarray(mask)


# -- plain layout ---------------------------------------------------------------------------


def _read_plain(root: Path, subsets: list[str], seed: int) -> Dataset:
    data = Dataset("plain", root)
    try:
        rows = _plain_rows(root)
    except (OSError, ValueError, csv.Error) as exc:
        raise RequestError("--dataset", f"{root}: prompts file unreadable ({exc})") from None
    for n, row in enumerate(rows):
        target = _plain_target(root, row, n)
        if isinstance(target, Target):
            data.available.append(target.subset)
        if isinstance(target, DataError) or not subsets or target.subset in subsets:
            _add(data, target)
    data.available = list(dict.fromkeys(data.available))
    return data


def _plain_rows(root: Path) -> list[dict]:
    if (root / "prompts.json").is_file():
        rows = json.loads((root / "prompts.json").read_text())
        assert isinstance(rows, list), "prompts.json must hold a list of objects"
        return rows
    with open(root / "prompts.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    for row in rows:  # "IMG:MASK;IMG:x1,y1,x2,y2" -> the JSON form
        specs = [s for s in (row.get("references") or "").split(";") if s.strip()]
        row["references"] = [_ref_from_spec(s.strip()) for s in specs]
    return rows


def _ref_from_spec(spec: str) -> dict:
    image, _, where = spec.rpartition(":")
    parts = where.split(",")
    if len(parts) == 4:
        return {"image": image, "box": [float(v) for v in parts]}
    return {"image": image, "mask": where}


def _plain_target(root: Path, row: dict, n: int) -> Target | DataError:
    try:
        refs = tuple(
            RefSpec(root / r["image"], mask=root / r["mask"] if r.get("mask") else None,
                    box=tuple(float(v) for v in r["box"]) if r.get("box") else None)  # type: ignore[arg-type]
            for r in row.get("references") or []
        )  # fmt: skip
        image = root / row["image"]
        return Target(
            id=safe_id(str(row.get("id") or Path(row["image"]).stem)),
            subset=str(row.get("subset") or root.name),
            question=str(row["prompt"]),
            image=image,
            gt=root / row["mask"],
            references=refs,
        )
    except (KeyError, ValueError, TypeError) as exc:
        return DataError(f"{root}/prompts row {n + 1}", f"bad row ({exc!r})")


# -- loading --------------------------------------------------------------------------------


def open_image(path: Path, mode: str = "RGB") -> Image.Image:
    """The decoded image, or :class:`DataError` naming the file."""
    try:
        with Image.open(path) as image:
            image.load()
            return image.convert(mode)
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        raise DataError(path, f"unreadable image ({exc})") from None


def _reference(spec: RefSpec) -> Reference:
    image = open_image(spec.image)
    if spec.mask is not None:
        mask = np.asarray(open_image(spec.mask, "L")) > 0
        if mask.shape != (image.height, image.width):
            raise DataError(spec.mask, f"mask {mask.shape[::-1]} != its image {image.size}")
        return Reference(image=image, mask=mask)
    return Reference(
        image=image, box=spec.box or (0.0, 0.0, float(image.width), float(image.height))
    )


def load_request(target: Target) -> Request:
    """The target as a pipeline request (images decoded); :class:`DataError` on a bad file."""
    refs = tuple(_reference(r) for r in target.references)
    return Request(image=open_image(target.image), question=target.question, references=refs)


def resize_mask(mask: np.ndarray, side: int) -> np.ndarray:
    """A bool mask resized to ``side x side``, nearest neighbour (``side`` 0: unchanged)."""
    if not side or mask.shape == (side, side):
        return mask
    small = Image.fromarray(mask.astype(np.uint8) * 255).resize((side, side), Image.Resampling.NEAREST)
    return np.asarray(small) > 127


def load_ground_truth(
    target: Target, size_wh: tuple[int, int], side: int = 0
) -> tuple[np.ndarray, np.ndarray | None]:
    """(foreground, ignore or None), bool, checked against the target image's ``size_wh`` and
    scored at ``side x side`` (0: that size). A mask image is resized as the reference does:
    its grey levels bicubic, then thresholded."""
    w, h = size_wh
    if target.gt.suffix == ".json":
        try:
            shapes = json.loads(target.gt.read_bytes().decode("utf-8", errors="replace"))["shapes"]
            raw = polygons_to_mask(shapes, (h, w))
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise DataError(target.gt, f"unreadable polygons ({exc})") from None
        ignore = resize_mask(raw == 255, side)
        return resize_mask(raw == 1, side), ignore if ignore.any() else None
    mask = open_image(target.gt, "L")
    if mask.size != (w, h):
        raise DataError(target.gt, f"mask is {mask.size[0]}x{mask.size[1]}, image is {w}x{h}")
    if side:
        mask = mask.resize((side, side), Image.Resampling.BICUBIC)  # PIL's default filter, as the reference
    return np.asarray(mask) > target.gt_threshold, None
