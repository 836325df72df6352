"""The GPU deployment stack (``gpu_stack.toml`` beside this file), read in one place.

``load()`` gives the NGC release, its image and the versions of the components it ships; the
TensorRT checks, the Dockerfile build, the Helm chart and the container-equivalent test use it.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import conceptseg

STACK_FILE = Path(__file__).with_name("gpu_stack.toml")


@dataclass(frozen=True)
class GpuStack:
    release: str  # NGC release, YY.MM
    triton_image: str  # the NGC image the deployment image is built FROM
    triton_server: str  # Triton Inference Server version in that image
    components: dict[str, str]  # tensorrt, tensorrt_llm, modelopt, python, torch, ...
    image_name: str  # our image, built by docker/Dockerfile

    @property
    def image(self) -> str:
        """Our deployment image reference: ``<name>:<conceptseg version>-<release>``."""
        return f"{self.image_name}:{conceptseg.__version__}-{self.release}"

    def __getitem__(self, component: str) -> str:
        return self.components[component]


@lru_cache(maxsize=1)
def load(path: Path = STACK_FILE) -> GpuStack:
    data = tomllib.loads(Path(path).read_text())
    return GpuStack(
        release=data["triton"]["release"],
        triton_image=data["triton"]["image"],
        triton_server=data["triton"]["server"],
        components=dict(data["components"]),
        image_name=data["image"]["name"],
    )
