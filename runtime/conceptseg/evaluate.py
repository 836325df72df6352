"""``conceptseg eval``: a dataset (``conceptseg.datasets``) through the in-process pipeline or a
running Triton server (``--url``), every mask saved, scored with ``conceptseg.metrics``.

Files (``--save-masks DIR``): ``DIR/<subset>/<id>.png`` (255 = concept, the target image's size)
and ``DIR/<subset>/<id>.json`` (route, presence, latency_ms, timings_ms). ``--resume`` runs no
target whose two files exist: it is scored from them. Masks are scored at the layout's resolution
(the benchmark's 600x600, others native; ``--metric-size``), the prediction resized nearest.
A target that cannot be loaded, or that the pipeline or server refuses, is a problem in the
report (file and reason), not an error. The report, tables and ``--compare`` are ``eval_report``.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from tqdm import tqdm

from conceptseg import contract, datasets, eval_report, metrics
from conceptseg.client import Client, ServerError
from conceptseg.datasets import DataError, Problem, Target
from conceptseg.eval_report import mask_paths, read_mask
from conceptseg.masks import to_png
from conceptseg.mosaic import CANVAS, TILE, build_mosaic
from conceptseg.pipeline_args import add_pipeline_args, config_from_args, pipeline_from_args
from conceptseg.types import Box, Reference, Request, RequestError


@dataclass
class Outcome:
    """One answered target, whichever way it was run."""

    mask: np.ndarray  # bool (H, W)
    route: str
    presence: float | None
    latency_ms: float
    timings_ms: dict[str, float] = field(default_factory=dict)
    versions: dict[str, Any] = field(default_factory=dict)


def served_references(refs: tuple[Reference, ...]) -> list[tuple[Image.Image, Box]]:
    """References as the server takes them (boxes only): a mask becomes the box whose tile frame
    box is exactly the one the mosaic derives from the mask, so both give the same prompt."""
    if not refs:
        return []
    mosaic = build_mosaic(refs)
    side = CANVAS if len(refs) == 1 else TILE
    out = []
    for i, (ref, (x1, y1, x2, y2)) in enumerate(zip(refs, mosaic.boxes, strict=True)):
        if ref.box is not None:
            out.append((ref.image, ref.box))
            continue
        dx, dy = (i % 2) * TILE, (i // 2) * TILE
        sx, sy = ref.image.width / side, ref.image.height / side
        # floor((b + .25) * s / s) = b and ceil((b + .75) * s / s) - 1 = b: the frame box again
        box = ((x1 - dx + 0.25) * sx, (y1 - dy + 0.25) * sy,
               (x2 - dx + 0.75) * sx, (y2 - dy + 0.75) * sy)  # fmt: skip
        out.append((ref.image, box))
    return out


class LocalRunner:
    """The in-process pipeline from the ``segment`` flags, built once (``load=False``, a fully
    resumed run: no model is loaded)."""

    def __init__(self, args: argparse.Namespace, load: bool = True) -> None:
        config_from_args(args)  # bad --preset/--max-new-tokens: an error even when nothing runs
        self.pipeline = pipeline_from_args(args) if load else None

    def __call__(self, request: Request) -> Outcome:
        assert self.pipeline is not None, "every target was expected to be resumed"
        start = time.perf_counter()
        result = self.pipeline.run(request)
        latency = (time.perf_counter() - start) * 1e3
        return Outcome(result.mask, result.route, result.presence, latency, result.timings_ms,
                       result.versions)  # fmt: skip

    def close(self) -> None:
        pass


class ServedRunner:
    """A running server through ``conceptseg.client``, one client per worker thread."""

    def __init__(self, args: argparse.Namespace) -> None:

        self.url, self.protocol = args.url, args.protocol
        self.options = contract.Options(router=not args.no_router)
        self.local = threading.local()
        self.clients: list[Any] = []
        self.lock = threading.Lock()

    def _client(self) -> Any:

        if not hasattr(self.local, "client"):
            self.local.client = Client(self.url, protocol=self.protocol)
            with self.lock:
                self.clients.append(self.local.client)
        return self.local.client

    def __call__(self, request: Request) -> Outcome:

        refs = served_references(request.references)
        start = time.perf_counter()
        try:
            response = self._client().segment(request.image, request.question, refs, self.options)
        except ServerError as exc:
            raise RequestError("server", f"{exc.status}: {exc.message}") from None
        latency = (time.perf_counter() - start) * 1e3
        r = response.result
        return Outcome(response.mask, r["route"], r.get("presence"), latency,
                       r.get("timings_ms", {}), r.get("versions", {}))  # fmt: skip

    def close(self) -> None:
        for client in self.clients:
            client.close()


def _saved(target: Target, save: Path) -> tuple[np.ndarray, dict[str, Any]] | None:
    png, js = mask_paths(save, target)
    if not (png.is_file() and js.is_file()):
        return None
    try:
        return read_mask(png), json.loads(js.read_text())
    except (DataError, ValueError):
        return None  # a half-written pair: run it again


def _run_one(target: Target, runner: Callable[[Request], Outcome], save: Path) -> dict[str, Any]:
    request = datasets.load_request(target)
    out = runner(request)
    png, js = mask_paths(save, target)
    png.parent.mkdir(parents=True, exist_ok=True)
    info = {
        "route": out.route,
        "presence": out.presence,
        "latency_ms": round(out.latency_ms, 3),
        "timings_ms": {k: round(v, 3) for k, v in out.timings_ms.items()},
    }
    png.write_bytes(to_png(out.mask))
    js.write_text(json.dumps(info) + "\n")
    return {"mask": out.mask, **info, "versions": out.versions, "resumed": False}


def score_target(target: Target, pred: np.ndarray, side: int) -> dict[str, float | int]:
    """Per-image metrics of a prediction at the target's size, scored at ``side`` (0: native)."""
    with Image.open(target.image) as image:  # the header only: the size to check against
        size = image.size
    if pred.shape != (size[1], size[0]):
        raise DataError(target.image, f"prediction {pred.shape[::-1]} != image {size}")
    gt, ignore = datasets.load_ground_truth(target, size, side)
    return metrics.per_image(datasets.resize_mask(pred, side), gt, ignore)


def evaluate_target(
    target: Target, runner: Callable[[Request], Outcome], save: Path, resume: bool, side: int
) -> dict[str, Any] | Problem:
    """One target: run it (or take its saved mask), score it; a problem instead of raising."""
    try:
        saved = _saved(target, save) if resume else None
        if saved is not None:
            record = {"mask": saved[0], **saved[1], "resumed": True}
        else:
            record = _run_one(target, runner, save)
        mask = record.pop("mask")
        scores = score_target(target, mask, side)
    except DataError as exc:
        return exc.problem
    except RequestError as exc:
        return Problem(str(target.image), f"refused: {exc}")
    except (OSError, ValueError) as exc:  # e.g. an image that decodes in the header only
        return Problem(str(target.image), f"{type(exc).__name__}: {exc}")
    return {"id": target.id, "subset": target.subset, **record, **scores}


def run_targets(
    targets: list[Target], runner: Callable[[Request], Outcome], save: Path, *,
    resume: bool, side: int, concurrency: int = 1,
) -> tuple[list[dict[str, Any]], list[Problem]]:  # fmt: skip
    """Every target with a progress bar (stderr); records in ``targets`` order, and problems."""

    results: dict[int, dict[str, Any] | Problem] = {}
    with (
        ThreadPoolExecutor(max_workers=concurrency) as pool,
        tqdm(
            total=len(targets), desc="eval", unit="target", file=sys.stderr, dynamic_ncols=True
        ) as bar,
    ):
        futures = {
            pool.submit(evaluate_target, t, runner, save, resume, side): i
            for i, t in enumerate(targets)
        }
        for future in as_completed(futures):
            results[futures[future]] = future.result()
            bar.update(1)
    ordered = [results[i] for i in range(len(targets))]
    return [r for r in ordered if isinstance(r, dict)], [
        r for r in ordered if isinstance(r, Problem)
    ]


def _limit(targets: list[Target], limit: int) -> list[Target]:
    if limit <= 0:
        return targets
    seen: dict[str, int] = {}
    kept = []
    for t in targets:
        seen[t.subset] = seen.get(t.subset, 0) + 1
        if seen[t.subset] <= limit:
            kept.append(t)
    return kept


def _check_args(args: argparse.Namespace) -> None:
    if not args.url and not args.weights:
        raise RequestError("--weights", "give the checkpoints directory, or --url SERVER")
    if args.concurrency < 1:
        raise RequestError("--concurrency", f"{args.concurrency}: give 1 or more")
    if args.concurrency > 1 and not args.url:
        raise RequestError(
            "--concurrency", "in-process runs one target at a time; use --url for concurrency"
        )
    if args.compare and not Path(args.compare).is_dir():
        raise RequestError("--compare", f"{args.compare} is not a directory of saved masks")
    if args.metric_size < -1:
        raise RequestError("--metric-size", "give N > 0, 0 (native size) or -1 (the layout's)")


def run(args: argparse.Namespace) -> None:
    """The ``eval`` command."""
    _check_args(args)
    data = datasets.read(Path(args.dataset), args.subset, args.layout, args.seed)
    targets = _limit(data.targets, args.limit)
    side = data.metric_size if args.metric_size < 0 else args.metric_size
    save = Path(args.save_masks)
    pending = not args.resume or any(
        not all(p.is_file() for p in mask_paths(save, t)) for t in targets
    )
    runner = ServedRunner(args) if args.url else LocalRunner(args, load=pending)
    try:
        records, problems = run_targets(
            targets, runner, save, resume=args.resume, side=side, concurrency=args.concurrency
        )
    finally:
        runner.close()
    report = eval_report.build(args, data, targets, records, data.problems + problems, side)
    if args.compare:
        report["compare"] = eval_report.compare(targets, save, Path(args.compare))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(eval_report.to_markdown(report))
    print(f"report: {out}\nmasks: {save}")


def add_eval_args(p: argparse.ArgumentParser) -> None:
    add_pipeline_args(p, weights_default="")
    p.add_argument("--dataset", required=True, help="dataset root (README 'Evaluation')")
    p.add_argument("--subset", action="append", help="only this subset (repeatable)")
    p.add_argument("--layout", choices=datasets.LAYOUTS, default=None, help="default: detected")
    p.add_argument("--out", required=True, help="the report JSON")
    p.add_argument("--save-masks", required=True, help="DIR/<subset>/<id>.png (+ .json)")
    p.add_argument("--resume", action="store_true", help="skip targets whose mask is saved")
    p.add_argument("--url", default=None, help="evaluate a running server: HOST:PORT, grpc://...")
    p.add_argument("--protocol", default=None, choices=["http", "grpc"], help="default: http")
    p.add_argument("--concurrency", type=int, default=1, help="--url: requests in flight")
    p.add_argument("--compare", default=None, help="another run's --save-masks: IoU per target")
    p.add_argument("--limit", type=int, default=0, help="the first N targets of each subset")
    p.add_argument("--seed", type=int, default=42, help="benchmark reference draws (42)")
    p.add_argument(
        "--metric-size", type=int, default=-1, help="score at NxN (0: native; default: layout's)"
    )


def register(sub: Any) -> None:
    p = sub.add_parser("eval", help="evaluate on a dataset: metrics, tables, report")
    add_eval_args(p)
    p.set_defaults(func=run)
