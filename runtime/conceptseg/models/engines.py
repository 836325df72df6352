"""SAM 3 and CTM over exported graphs, whatever runs them (ONNX Runtime, TensorRT, Triton BLS).

A graph is anything with ``run(**feeds) -> dict[str, np.ndarray]`` under the names of
``conceptseg_export/graphs.py``; ``backends/ort.py``, ``backends/trt.py`` and the orchestrator's
BLS calls provide them. The engines directory's
``manifest.json`` and per-graph JSON files are the contract (prompt layout, CTM buckets, shapes).
"""

from __future__ import annotations

import json
from collections import OrderedDict
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from PIL import Image

from conceptseg.models.sam3_inputs import (
    Sam3Tokenizer,
    build_prompt,
    heads_feeds,
    heads_output,
    preprocess,
)
from conceptseg.protocols import SegOutput
from conceptseg.types import RequestError

CTM_BUCKETS = (128, 256, 512, 768)  # CTM sequence lengths the graphs and plans are built for


def find_one(engines: Path, pattern: str, flag: str, hint: str) -> Path:
    """The single ``engines/<pattern>`` directory, or a RequestError naming ``flag``."""
    found = sorted(p for p in Path(engines).glob(pattern) if p.is_dir())
    if len(found) != 1:
        raise RequestError(
            flag,
            f"{engines} has {len(found)} {pattern} directories ({[p.name for p in found]}); "
            f"{hint} or name one with {flag}",
        )
    return found[0]


def find_plans(engines: Path, plans: Path | None = None) -> Path:
    """The plans directory: ``plans`` if given, else the one ``engines/trt-*`` directory."""
    if plans is not None:
        return Path(plans)
    return find_one(
        engines, "trt-*", "--plans", "build one with `conceptseg build-engines --onnx ENGINES`"
    )


SAM3_PRECISIONS = ("fp32", "int8")  # int8: the vision encoder only (sam3_vision.int8.onnx)


def vision_graph(precision: str) -> str:
    """The file stem of the image encoder for ``precision``."""
    if precision not in SAM3_PRECISIONS:
        raise RequestError("--sam3-precision", f"{precision!r} is not one of {SAM3_PRECISIONS}")
    return "sam3_vision" if precision == "fp32" else "sam3_vision.int8"


class Graph(Protocol):
    def run(self, **feeds: np.ndarray) -> dict[str, np.ndarray]: ...


def read_manifest(engines: Path) -> dict[str, Any]:
    path = Path(engines) / "manifest.json"
    if not path.exists():
        raise RequestError(
            "--engines",
            f"{engines} has no manifest.json; create it with "
            "`conceptseg export --weights DIR --out ENGINES`",
        )
    return json.loads(path.read_text())


def image_side(engines: Path) -> int:
    """The vision graph's square input side, from its manifest (1008 for the real SAM 3)."""
    graph = json.loads((Path(engines) / "sam3_vision.json").read_text())
    return int(graph["inputs"][0]["shape"][-1])


class EngineImage:
    """SAM 3 image features of one image: the three FPN levels, each (1, C, h, w)."""

    def __init__(self, fpn: tuple[np.ndarray, np.ndarray, np.ndarray]) -> None:
        self._fpn = fpn

    @property
    def fpn(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        return self._fpn


class EngineSam3:
    """:class:`SegBackend` on the ``sam3_vision``, ``sam3_text`` and ``sam3_heads`` graphs."""

    def __init__(self, engines: Path, graphs: dict[str, Graph], *, text_cache: int = 256) -> None:
        self.engines = Path(engines)
        self.q_max = int(read_manifest(self.engines)["q_max"])
        self.vision, self.text, self.heads = (
            graphs[n] for n in ("sam3_vision", "sam3_text", "sam3_heads")
        )
        self.side = image_side(self.engines)
        self.tokenize = Sam3Tokenizer.from_dir(self.engines / "sam3_tokenizer")
        self._text: OrderedDict[str, tuple[np.ndarray, np.ndarray]] = OrderedDict()
        self._text_cache = text_cache

    def encode_image(self, image: Image.Image) -> EngineImage:
        pixels = preprocess(image, self.side)
        out = self.vision.run(image=pixels)
        return EngineImage((out["fpn0"], out["fpn1"], out["fpn2"]))

    def text_features(self, text: str) -> tuple[np.ndarray, np.ndarray]:
        """(32, 256) features and (32,) mask of ``text``, cached per string."""
        if text in self._text:
            self._text.move_to_end(text)
            return self._text[text]
        ids, mask = self.tokenize(text)
        feats = self.text.run(input_ids=ids, attention_mask=mask)["text_features"][0]
        self._text[text] = (feats, mask[0])
        if len(self._text) > self._text_cache:
            self._text.popitem(last=False)
        return self._text[text]

    def segment(
        self,
        features: EngineImage,
        text: str,
        concept: np.ndarray | None = None,
        instances: bool = False,
    ) -> SegOutput:
        prompt, mask = build_prompt(*self.text_features(text), concept, self.q_max)
        return heads_output(self.run_heads(heads_feeds(features.fpn, prompt, mask), instances))

    def run_heads(self, feeds: dict[str, np.ndarray], instances: bool) -> dict[str, np.ndarray]:
        """The heads graph's outputs (``instance_masks`` only when ``instances``)."""
        out = self.heads.run(**feeds)
        if not instances:
            out.pop("instance_masks", None)
        return out


def bucket(length: int, buckets: tuple[int, ...]) -> int:
    """The smallest bucket >= ``length`` (multiples of the largest bucket beyond it)."""
    for size in buckets:
        if length <= size:
            return size
    top = buckets[-1]
    return -(-length // top) * top


def pad_hidden(
    hiddens: list[np.ndarray], buckets: tuple[int, ...]
) -> tuple[np.ndarray, np.ndarray]:
    """Stack (L_i, H) states into (B, S, H) with S a bucket, and the (B, S) int64 key mask."""
    size = bucket(max(h.shape[0] for h in hiddens), buckets)
    batch = np.zeros((len(hiddens), size, hiddens[0].shape[1]), np.float32)
    mask = np.zeros((len(hiddens), size), np.int64)
    for i, h in enumerate(hiddens):
        batch[i, : h.shape[0]], mask[i, : h.shape[0]] = h, 1
    return batch, mask


class EngineCtm:
    """:class:`CTMBackend` on the ``ctm`` graph; sequences padded to buckets, padding masked."""

    def __init__(self, engines: Path, graph: Graph) -> None:
        self.graph = graph
        self.buckets = tuple(read_manifest(Path(engines))["ctm_buckets"])

    def batch(self, hiddens: list[np.ndarray]) -> np.ndarray:
        """(B, Q, 256) concept tokens for several completions at once."""
        hidden, mask = pad_hidden(hiddens, self.buckets)
        return self.graph.run(hidden=hidden, key_mask=mask)["concept"]

    def __call__(self, hidden: np.ndarray) -> np.ndarray:
        return self.batch([np.asarray(hidden, np.float32)])[0]
