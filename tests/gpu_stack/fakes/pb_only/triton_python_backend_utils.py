"""A stand-in for Triton's ``triton_python_backend_utils`` (python_backend's stub module).

Tensors, responses, errors, the logger and BLS: ``InferenceRequest(...).async_exec()`` answers
from ``ROUTES[model_name](inputs) -> {name: array}`` (decoupled: a list of such dicts), which the
driver fills in, as Triton routes a BLS call to another model's stub.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

import numpy as np

TRITONSERVER_RESPONSE_COMPLETE_FINAL = 1
ROUTES: dict = {}
CALLS: list = []  # (model, input names) of every BLS call


@dataclass
class Tensor:
    name_: str
    array: np.ndarray

    def name(self):
        return self.name_

    def as_numpy(self):
        return self.array


@dataclass
class TritonError:
    message_: str
    code_: int = 13
    UNAVAILABLE = 2  # the TRITONSERVER_Error codes of the Python backend's TritonError
    INVALID_ARG = 3
    CANCELLED = 11
    INTERNAL = 13

    def __init__(self, message, code=13):
        self.message_, self.code_ = message, code

    def message(self):
        return self.message_

    def code(self):
        return self.code_


@dataclass
class InferenceResponse:
    output_tensors_: list = field(default_factory=list)
    error_: TritonError | None = None

    def __init__(self, output_tensors=(), error=None):
        self.output_tensors_, self.error_ = list(output_tensors), error

    def has_error(self):
        return self.error_ is not None

    def error(self):
        return self.error_

    def output_tensors(self):
        return self.output_tensors_


def get_input_tensor_by_name(request, name):
    return request.input(name)


def get_output_tensor_by_name(response, name):
    return next((t for t in response.output_tensors_ if t.name() == name), None)


def using_decoupled_model_transaction_policy(config):
    return bool(config.get("model_transaction_policy", {}).get("decoupled"))


class Logger:
    lines: list = []

    @classmethod
    def log_error(cls, message):
        cls.lines.append(("error", message))

    @classmethod
    def log_warn(cls, message):
        cls.lines.append(("warn", message))

    @classmethod
    def log_info(cls, message):
        cls.lines.append(("info", message))


class InferenceRequest:
    def __init__(self, model_name, inputs, requested_output_names):
        self.model_name, self.inputs = model_name, {t.name(): t.as_numpy() for t in inputs}
        self.outputs = requested_output_names

    def _response(self, arrays):
        return InferenceResponse([Tensor(n, np.asarray(arrays[n])) for n in arrays])

    async def async_exec(self, decoupled=False):
        await asyncio.sleep(0)
        CALLS.append((self.model_name, sorted(self.inputs)))
        answer = ROUTES[self.model_name](self.inputs)
        if decoupled:
            return iter([self._response(a) for a in answer] + [InferenceResponse()])
        return self._response({n: answer[n] for n in self.outputs})
