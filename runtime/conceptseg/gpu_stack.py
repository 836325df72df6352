"""The GPU deployment stack (``gpu_stack.toml`` beside this file), read in one place.

``load()`` gives the NGC release, its image and the versions of the components it ships; the
TensorRT checks, the Dockerfile build, the Helm chart and the container-equivalent test use it.
``python -m conceptseg.gpu_stack COMPONENT`` prints one version (``image``, ``triton_image``,
``release``, ``triton_server`` or a component: ``tensorrt``, ``modelopt``, ...), for shells;
``python -m conceptseg.gpu_stack pip COMPONENT`` its pip requirement (``tensorrt==...``).
"""

from __future__ import annotations

import sys
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
    container_requirements: tuple[str, ...] = ()  # besides transformers, for tests/gpu_stack

    @property
    def image(self) -> str:
        """Our deployment image reference: ``<name>:<conceptseg version>-<release>``."""
        return f"{self.image_name}:{conceptseg.__version__}-{self.release}"

    def __getitem__(self, component: str) -> str:
        return self.components[component]

    @property
    def tensorrt_major(self) -> str:
        """``"10"``: plans, the API checks and the op table follow this TensorRT major."""
        return self["tensorrt"].split(".")[0]

    def requirement(self, component: str) -> str:
        """The pip requirement of a component at the stack's version (``tensorrt==<version>``)."""
        names = {"modelopt": "nvidia-modelopt[onnx]", "tensorrt_llm": "tensorrt_llm"}
        return f"{names.get(component, component)}=={self[component]}"

    def rebuild_hint(self) -> str:
        """The command that rebuilds plans with this stack's TensorRT (README "GPU")."""
        return (
            f"docker run --gpus all -v $PWD:/work {self.image} conceptseg build-engines "
            "--onnx /work/engines/NAME --precision fp16"
        )


@lru_cache(maxsize=1)
def load(path: Path = STACK_FILE) -> GpuStack:
    data = tomllib.loads(Path(path).read_text())
    return GpuStack(
        release=data["triton"]["release"],
        triton_image=data["triton"]["image"],
        triton_server=data["triton"]["server"],
        components=dict(data["components"]),
        image_name=data["image"]["name"],
        container_requirements=tuple(data.get("container", {}).get("requirements", ())),
    )


def lookup(key: str, stack: GpuStack | None = None) -> str:
    """One value by name: a field of :class:`GpuStack`, ``image``, or a component."""
    stack = stack or load()
    if key in ("image", "release", "triton_image", "triton_server"):
        return str(getattr(stack, key))
    if key in stack.components:
        return stack[key]
    known = ["image", "release", "triton_image", "triton_server", *stack.components]
    raise KeyError(f"{key!r} is not one of {known}")


if __name__ == "__main__":
    try:
        if len(sys.argv) == 3 and sys.argv[1] == "pip":
            print(load().requirement(sys.argv[2]) if sys.argv[2] in load().components else lookup(sys.argv[2]))
        else:
            print(lookup(sys.argv[1]) if len(sys.argv) == 2 else load())
    except KeyError as exc:
        print(f"error: {exc.args[0]}", file=sys.stderr)
        sys.exit(2)
