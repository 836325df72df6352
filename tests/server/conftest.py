"""The real Triton server on 127.0.0.1 (free ports), started once per test session, always stopped.

It serves the tiny synthetic engines (cpu profile) with small request limits, and with explicit
model control so that a test can take an engine model away. ``reference`` is the in-process
pipeline on the same engines and config, what every served answer is compared with.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import asdict

import pytest

from conceptseg.config import from_name

# small limits: the oversized-image and overlong-prompt cases stay cheap to send
CONFIG = from_name(
    "test",
    max_new_tokens=8,
    max_image_pixels=1_000_000,
    max_image_bytes=2_000_000,
    max_prompt_chars=200,
    max_request_pixels=1_500_000,
)


@contextmanager
def _serving(engines, **options):
    """A started server on the ``engines``, free loopback ports, ``options`` as ServeConfig
    fields; always stopped. Skips where the pytriton wheel's server is missing."""
    pytest.importorskip("tritonclient")
    from conceptseg.serving.server import ServeConfig, Server, find_triton, free_port
    from conceptseg.types import RequestError

    try:
        find_triton()
    except RequestError as exc:
        pytest.skip(str(exc))
    ports = {n: free_port() for n in ("http_port", "grpc_port", "metrics_port")}
    server = Server(ServeConfig(engines=engines, **ports, **options))
    try:
        server.start()
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def serving():
    """``with serving(engines, **options) as server``: a server of one's own (other options)."""
    return _serving


@pytest.fixture(scope="session")
def triton(tiny_engines, serving):
    with serving(tiny_engines, model_control="explicit", pipeline_config=asdict(CONFIG)) as server:
        yield server


@pytest.fixture(scope="session")
def reference(tiny_weights, tiny_engines):
    from conceptseg.build import build_pipeline

    return build_pipeline(tiny_weights, backend="onnxruntime", engines=tiny_engines, config=CONFIG)
