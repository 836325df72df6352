"""SAM 3 over the ``sam3_*`` engine models: the image encoder call is submitted, not awaited.

``encode_image`` returns a :class:`PendingImage`, so the vision model runs while the pipeline
goes on to the MLLM whenever no router probe needs the features first.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from conceptseg.models.engines import EngineImage, EngineSam3
from conceptseg.models.sam3_inputs import preprocess
from conceptseg.serving.bls import Bls, BlsGraph


class PendingImage(EngineImage):
    """Image features being computed by the ``sam3_vision`` model (resolved on first use)."""

    def __init__(self, future: Future, wait: Callable[[Future], Any] = Future.result) -> None:
        self.future, self.wait = future, wait
        self.started = time.perf_counter()
        # The callback must not hold ``self``: a Future keeps its callbacks after it is done, so
        # a bound method would make a reference cycle, and the features (tens of MB at real
        # size) would wait for the cyclic GC (measured: the orchestrator's RSS saw-toothed by
        # 25 % with the GC's rhythm). The finish time goes into a box the future holds instead.
        self._finished = box = [0.0]
        future.add_done_callback(lambda _: box.__setitem__(0, time.perf_counter()))

    @property
    def elapsed_ms(self) -> float:
        """Wall time of the vision call, submit to result (0 while it runs)."""
        return max(self._finished[0] - self.started, 0.0) * 1e3

    @property
    def fpn(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        out = self.wait(self.future)
        return out["fpn0"], out["fpn1"], out["fpn2"]


def _graph_outputs(engines: Path, name: str) -> tuple[str, ...]:
    manifest = json.loads((Path(engines) / f"{name}.json").read_text())
    return tuple(t["name"] for t in manifest["outputs"])


class TritonSam3(EngineSam3):
    """:class:`SegBackend` on the ``sam3_*`` engine models, shared by all requests (thread-safe)."""

    def __init__(self, engines: Path, bls: Bls) -> None:
        names = ("sam3_vision", "sam3_text", "sam3_heads")
        super().__init__(engines, {n: BlsGraph(bls, n, _graph_outputs(engines, n)) for n in names})
        self.bls = bls
        self._lock = threading.Lock()  # the text cache and the tokenizer are not thread-safe
        heads = _graph_outputs(engines, "sam3_heads")
        self._heads_outputs = {
            True: heads,
            False: tuple(n for n in heads if n != "instance_masks"),  # (K, 4g, 4g): only on demand
        }

    def encode_image(self, image: Image.Image) -> PendingImage:
        pixels = preprocess(image, self.side)
        outputs = ("fpn0", "fpn1", "fpn2")
        since = self.bls.deaths.count("sam3_vision")
        future = self.bls.submit("sam3_vision", {"image": pixels}, outputs)
        return PendingImage(future, lambda f: self.bls.wait(f, "sam3_vision", since))

    def text_features(self, text: str) -> tuple[np.ndarray, np.ndarray]:
        with self._lock:
            return super().text_features(text)

    def run_heads(self, feeds: dict[str, np.ndarray], instances: bool) -> dict[str, np.ndarray]:
        return self.bls.call("sam3_heads", feeds, self._heads_outputs[instances])
