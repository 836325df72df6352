"""Parse the MLLM's tagged answer, whole or chunk by chunk.

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
from dataclasses import dataclass
from typing import Literal

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


@dataclass(frozen=True)
class TagEvent:
    """One thing the stream said: a tag opened or closed, or text inside ``tag``.

    ``tag`` is the lower-case tag name, or ``None`` for text outside any known tag.
    Text events of one stretch may arrive in several pieces; :func:`coalesce` joins them.
    """

    kind: Literal["open", "close", "text"]
    tag: str | None
    text: str = ""


def coalesce(events: list[TagEvent]) -> list[TagEvent]:
    """Join consecutive text events of the same tag (the split depends on chunking)."""
    out: list[TagEvent] = []
    for event in events:
        if out and event.kind == "text" == out[-1].kind and event.tag == out[-1].tag:
            out[-1] = TagEvent("text", event.tag, out[-1].text + event.text)
        elif event.kind != "text" or event.text:
            out.append(event)
    return out


_TAGS = {f"<{n}>": ("open", n) for n in TAG_NAMES} | {f"</{n}>": ("close", n) for n in TAG_NAMES}
_LONGEST_TAG = max(map(len, _TAGS))


class StreamParser:
    """Incremental tag parser: ``feed`` each decoded chunk, read events as they happen.

    For any split of a text into chunks, ``result()`` equals ``parse(text)`` and the coalesced
    events are the same. A chunk ending in what may be the start of a tag (``"<"``, ``"</ans"``)
    is held back until the next chunk decides it.
    """

    def __init__(self) -> None:
        self._text: list[str] = []
        self._pending = ""  # possible start of a tag, not yet emitted
        self._current: str | None = None  # tag whose text is streaming now
        self.closed: set[str] = set()

    def feed(self, chunk: str) -> list[TagEvent]:
        self._text.append(chunk)
        buffer, self._pending = self._pending + chunk, ""
        events: list[TagEvent] = []
        i = 0
        while (lt := buffer.find("<", i)) != -1:
            events.append(TagEvent("text", self._current, buffer[i:lt]))
            candidate = buffer[lt : lt + _LONGEST_TAG].lower()
            tag = next((t for t in _TAGS if candidate.startswith(t)), None)
            if tag is not None:
                events.append(self._on_tag(*_TAGS[tag]))
                i = lt + len(tag)
            elif any(t.startswith(candidate) for t in _TAGS) and lt + len(candidate) == len(buffer):
                self._pending = buffer[lt:]  # undecided: wait for more text
                return coalesce(events)
            else:
                events.append(TagEvent("text", self._current, "<"))
                i = lt + 1
        events.append(TagEvent("text", self._current, buffer[i:]))
        return coalesce(events)

    def flush(self) -> list[TagEvent]:
        """End of stream: a held-back partial tag is plain text after all."""
        pending, self._pending = self._pending, ""
        return coalesce([TagEvent("text", self._current, pending)])

    def _on_tag(self, kind: str, name: str) -> TagEvent:
        if kind == "open":
            self._current = name
        else:
            self.closed.add(name)
            if self._current == name:
                self._current = None
        return TagEvent(kind, name)  # type: ignore[arg-type]

    @property
    def text(self) -> str:
        return "".join(self._text)

    def result(self) -> Answer:
        return parse(self.text)
