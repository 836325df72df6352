"""The orchestrator's per-request cancellation state: the client's deadline and Triton's
``is_cancelled``, which is never asked once the request is answered (asking then crashes
tritonserver 2.51: the response factory is freed).

Run: .venv/bin/pytest tests/unit/test_ticket.py -q   (seconds)
"""

from __future__ import annotations

import time

import pytest

from conceptseg.serving.orchestrator import Ticket
from conceptseg.types import Cancelled


def test_a_passed_deadline_cancels():
    ticket = Ticket(deadline=time.monotonic() - 1)
    with pytest.raises(Cancelled, match="client went away"):
        ticket.check()


def test_is_cancelled_is_asked_until_the_request_is_finished():
    asked = []
    ticket = Ticket(is_cancelled=lambda: asked.append(1) or False)
    assert ticket.poll() is False and asked == [1]
    ticket.finish()
    assert ticket.poll() is False and asked == [1], "not asked after finish"


def test_a_released_request_counts_as_gone():
    def released() -> bool:
        raise RuntimeError("the request was released")

    assert Ticket(is_cancelled=released).poll() is True
