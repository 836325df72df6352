"""Parse the MLLM's tagged answer.

Grammar the model is trained to write (METHOD.md section 4)::

    <think>...</think> <rule>...</rule> [<check>[x1, y1, x2, y2]</check>]
    <bbox>[x3, y3, x4, y4]</bbox> <answer>noun phrase</answer>

Tags are plain text. Real generations break the grammar (cut off at the token limit, answers
over several lines, floats, swapped or negative coordinates, repeated tags), so every rule below
gives a defined result and nothing here raises on any ``str``:

- tag names match case-insensitively;
- ``think`` and ``rule`` come from the first closed pair;
- ``answer`` comes from the last closed pair, whitespace collapsed, one pair of surrounding
  matching quotes removed; an ``<answer>`` opened but never closed (generation cut off) gives the
  text after it, any partial closing tag removed, and ``complete=False``;
- ``bbox`` and ``check`` are the first four numbers inside the last closed pair, reordered so
  that x1 <= x2 and y1 <= y2; fewer than four numbers give ``None``.

Coordinates are returned as written (600x600 frame for the reference model); mapping them to the
original image is the caller's job (``conceptseg.mosaic.from_canvas``).
"""

from __future__ import annotations

import re

from conceptseg.types import Answer, Box

TAG_NAMES = ("think", "rule", "check", "bbox", "answer")

_NUMBER = re.compile(r"[-+]?(?:\d+(?:\.\d*)?|\.\d+)")
_QUOTES = {'"': '"', "'": "'", "“": "”", "‘": "’", "`": "`"}


def _closed_pairs(text: str, name: str) -> list[str]:
    """Contents of every closed ``<name>...</name>`` pair, in order.

    A pair is a closing tag and the nearest opening tag before it, so ``<a>x<a>y</a>`` gives
    ``["y"]``: the inner, most recent opening wins, as a reader would pair them.
    """
    lower = text.lower()
    open_tag, close_tag = f"<{name}>", f"</{name}>"
    pairs, start = [], 0
    while (close := lower.find(close_tag, start)) != -1:
        opened = lower.rfind(open_tag, start, close)
        if opened != -1:
            pairs.append(text[opened + len(open_tag) : close])
        start = close + len(close_tag)
    return pairs


def _first(text: str, name: str) -> str | None:
    pairs = _closed_pairs(text, name)
    return pairs[0].strip() if pairs else None


def _box(text: str, name: str) -> Box | None:
    pairs = _closed_pairs(text, name)
    if not pairs:
        return None
    numbers = [float(n) for n in _NUMBER.findall(pairs[-1])[:4]]
    if len(numbers) < 4:
        return None
    x1, y1, x2, y2 = numbers
    return (min(x1, x2), min(y1, y2), max(x1, x2), max(y1, y2))


def _strip_partial_close(text: str, name: str) -> str:
    """Remove a trailing prefix of ``</name>`` (``"<"``, ``"</ans"``...) cut off by the limit."""
    close_tag, lower = f"</{name}>", text.lower()
    for size in range(min(len(close_tag) - 1, len(text)), 0, -1):
        if lower.endswith(close_tag[:size]):
            return text[:-size]
    return text


def clean_answer(text: str) -> str:
    """Collapse whitespace, strip, remove one pair of surrounding matching quotes."""
    text = " ".join(text.split())
    if len(text) >= 2 and _QUOTES.get(text[0]) == text[-1]:
        text = text[1:-1].strip()
    return text


def _answer(text: str) -> tuple[str, bool]:
    pairs = _closed_pairs(text, "answer")
    if pairs:
        return clean_answer(pairs[-1]), True
    opened = text.lower().rfind("<answer>")
    if opened == -1:
        return "", False
    tail = _strip_partial_close(text[opened + len("<answer>") :], "answer")
    return clean_answer(tail), False


def parse(text: str) -> Answer:
    """Parse a whole generation into an :class:`Answer` (never raises)."""
    answer, complete = _answer(text)
    return Answer(
        think=_first(text, "think") or "",
        rule=_first(text, "rule"),
        check=_box(text, "check"),
        bbox=_box(text, "bbox"),
        answer=answer,
        complete=complete,
    )
