"""The Triton BLS orchestrator: ``conceptseg.pipeline`` unchanged over the engine models.

Each request runs in a worker thread of the orchestrator's pool (the pipeline is synchronous);
its SAM 3, MLLM and CTM calls are BLS calls (``serving.bls``). Imports neither torch nor
transformers: the stub holds numpy, PIL and tokenizers only.
"""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from conceptseg import contract
from conceptseg.config import PipelineConfig
from conceptseg.models.engines import EngineCtm, read_manifest
from conceptseg.pipeline import Pipeline
from conceptseg.protocols import SegOutput
from conceptseg.serving.bls import Bls, BlsGraph
from conceptseg.serving.mllm import TritonMllm
from conceptseg.serving.sam3 import PendingImage, TritonSam3
from conceptseg.textstream import OnText
from conceptseg.types import Result
from conceptseg.versions import versions


class _RequestSeg:
    """One request's view of the shared :class:`TritonSam3`: keeps its pending image call."""

    def __init__(self, sam3: TritonSam3) -> None:
        self.sam3 = sam3
        self.pending: PendingImage | None = None

    def encode_image(self, image: Any) -> PendingImage:
        pending = self.sam3.encode_image(image)
        self.pending = pending
        return pending

    def segment(self, features: PendingImage, text: str, concept: Any = None,
                instances: bool = False) -> SegOutput:  # fmt: skip
        return self.sam3.segment(features, text, concept, instances)


def serving_versions(engines: Path, params: dict[str, str]) -> dict[str, Any]:
    """What ``Result.versions`` says when served (the in-process keys, plus the profile)."""
    weights = Path(read_manifest(engines)["weights"])
    return versions(
        weights, backend=f"triton-{params['profile']}", serving="triton", engines=str(engines)
    )


class Orchestrator:
    """``run(request, options)``: the in-process pipeline over the engine models."""

    def __init__(
        self,
        engines: Path,
        bls: Bls,
        config: PipelineConfig,
        versions: dict[str, Any],
        workers: int = 8,
    ) -> None:
        self.pool = ThreadPoolExecutor(workers, thread_name_prefix="conceptseg-request")
        self.sam3 = TritonSam3(engines, bls)
        self.mllm = TritonMllm(bls)
        self.ctm = EngineCtm(engines, BlsGraph(bls, "ctm", ("concept",)))
        self.config, self.versions = config, versions

    def run(self, request: Any, options: contract.Options, on_text: OnText | None = None) -> Result:
        config = replace(self.config, router=self.config.router and options.router)
        threshold = options.instance_threshold if options.instance_masks else None
        seg = _RequestSeg(self.sam3)
        result = Pipeline(seg, self.mllm, self.ctm, config, self.versions).run(
            request, on_text, instances=threshold
        )
        if seg.pending is not None:
            # the pipeline's "sam3_image" only submits the call: report the engine call's own time
            result.timings_ms["sam3_vision"] = seg.pending.elapsed_ms
        return result

    async def submit(
        self, arrays: dict[str, np.ndarray], on_text: OnText | None = None
    ) -> dict[str, np.ndarray]:
        """:meth:`handle` in a worker thread of this orchestrator's pool."""
        return await asyncio.wrap_future(self.pool.submit(self.handle, arrays, on_text))

    def handle(
        self, arrays: dict[str, np.ndarray], on_text: OnText | None = None
    ) -> dict[str, np.ndarray]:
        """Request tensors -> response tensors (RequestError for a bad request); ``on_text``
        receives the reasoning text in deltas while the MLLM generates."""
        start = time.perf_counter()
        request, options = contract.from_request_arrays(arrays, self.config)
        decoded = time.perf_counter()
        result = self.run(request, options, on_text)
        result.timings_ms["request_decode"] = (decoded - start) * 1e3
        result.timings_ms["total"] = (time.perf_counter() - start) * 1e3
        return contract.to_response_arrays(result, options)
