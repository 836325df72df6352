"""SAM 3 and CTM backends over exported graphs, whatever runs them (ONNX Runtime or TensorRT).

A graph is anything with ``run(**feeds) -> dict[str, np.ndarray]`` under the names of
``export/graphs.py``; ``ort.py`` and ``trt.py`` provide them. The engines directory's
``manifest.json`` and per-graph JSON files are the contract (prompt layout, CTM buckets, shapes).
"""

from __future__ import annotations

import json
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from PIL import Image

from conceptseg.backends.base import SegOutput
from conceptseg.types import RequestError

PAD_BOX_LABEL = -10


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


@dataclass
class EngineImage:
    """SAM 3 image features of one image: the three FPN levels, each (1, C, h, w)."""

    fpn: tuple[np.ndarray, np.ndarray, np.ndarray]


def build_prompt(
    text: np.ndarray, text_mask: np.ndarray, concept: np.ndarray | None, q_max: int
) -> tuple[np.ndarray, np.ndarray]:
    """The heads graph's static prompt: ``[concept slots (q_max); text (32)]`` and its mask.

    ``text`` (32, 256), ``text_mask`` (32,), ``concept`` (Q, 256) or None -> (q_max + 32, 256)
    float32 and (q_max + 32,) int64. Unused concept slots are zeros with mask 0, which SAM 3
    ignores exactly.
    """
    width = text.shape[-1]
    slots = np.zeros((q_max, width), np.float32)
    slot_mask = np.zeros(q_max, np.int64)
    if concept is not None:
        q = concept.shape[0]
        if q > q_max:
            raise RequestError(
                "concept", f"{q} concept tokens, but the heads graph has {q_max} slots"
            )
        slots[:q], slot_mask[:q] = concept, 1
    prompt = np.concatenate([slots, text.astype(np.float32)], axis=0)
    return prompt, np.concatenate([slot_mask, text_mask.astype(np.int64)])


def heads_output(out: dict[str, np.ndarray], row: int = 0) -> SegOutput:
    """One row of the heads graph's outputs as a :class:`SegOutput` (instances already top-K)."""
    presence = float(1.0 / (1.0 + np.exp(-out["presence_logits"][row, 0])))
    return SegOutput(
        presence=presence,
        semantic_logits=out["semantic_logits"][row, 0],
        scores=out["instance_scores"][row],
        boxes=out["instance_boxes"][row],
    )


class EngineSam3:
    """:class:`SegBackend` on the ``sam3_vision``, ``sam3_text`` and ``sam3_heads`` graphs."""

    def __init__(self, engines: Path, graphs: dict[str, Graph], *, text_cache: int = 256) -> None:
        from conceptseg.backends.torch_sam3 import Sam3Tokenizer

        self.engines = Path(engines)
        self.q_max = int(read_manifest(self.engines)["q_max"])
        self.vision, self.text, self.heads = (
            graphs[n] for n in ("sam3_vision", "sam3_text", "sam3_heads")
        )
        self.side = image_side(self.engines)
        self.tokenize = Sam3Tokenizer(self.engines / "sam3_tokenizer")
        self._text: OrderedDict[str, tuple[np.ndarray, np.ndarray]] = OrderedDict()
        self._text_cache = text_cache

    def encode_image(self, image: Image.Image) -> EngineImage:
        from conceptseg.backends.torch_sam3 import preprocess  # Meta's resize, shared with torch

        pixels = preprocess(image, self.side).numpy()
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
        self, features: EngineImage, text: str, concept: np.ndarray | None = None
    ) -> SegOutput:
        prompt, mask = build_prompt(*self.text_features(text), concept, self.q_max)
        out = self.heads.run(
            fpn0=features.fpn[0],
            fpn1=features.fpn[1],
            fpn2=features.fpn[2],
            prompt=prompt[None],
            prompt_mask=mask[None],
            boxes=np.zeros((1, 1, 4), np.float32),
            box_labels=np.full((1, 1), PAD_BOX_LABEL, np.int64),
        )
        return heads_output(out)


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
