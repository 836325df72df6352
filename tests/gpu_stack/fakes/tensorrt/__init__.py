"""A stand-in for the container's TensorRT: its version only (what the gpu-profile checks read)."""

from conceptseg import gpu_stack

__version__ = gpu_stack.load()["tensorrt"]
