"""A stand-in for the container's torch, for the ``mllm`` stub's glue only (numpy inside).

The container ships its own torch build (gpu_stack.toml ``torch``), which is on no package index;
here the glue needs ``import torch``, ``torch.cuda.is_available()``, ``torch.cat`` and the
tensor calls it makes on TensorRT-LLM's outputs. The decision rule's tensor math is not run here
(TensorRT-LLM calls it on the GPU; tests/gpu/test_trtllm.py covers it).
"""

from __future__ import annotations

import numpy as np

__version__ = "0+fake"
inf = float("inf")
long = np.int64
float32 = np.float32


class Tensor:
    def __init__(self, array):
        self._a = np.asarray(array)

    @property
    def shape(self):
        return self._a.shape

    def reshape(self, *shape):
        return Tensor(self._a.reshape(*shape))

    def float(self):
        return Tensor(self._a.astype(np.float32))

    def cpu(self):
        return self

    def numpy(self):
        return self._a


def tensor(data, device=None, dtype=None):
    return Tensor(np.asarray(data, dtype=dtype))


def cat(tensors, dim=0):
    return Tensor(np.concatenate([t._a for t in tensors], axis=dim))


class cuda:  # noqa: N801
    @staticmethod
    def is_available():
        return True
