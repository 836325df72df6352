"""Incremental detokenization: the completion's text as deltas while tokens are generated.

Byte-level BPE splits multi-byte characters over tokens, so decoding a prefix of the ids can end
in U+FFFD, the replacement character, until the rest of the character arrives. A delta is
released only when the decoded prefix does not end in U+FFFD and extends what was already
released; ``finish`` releases what is left of the final text. The deltas always concatenate to
the final text whenever decoding a prefix only ever appends to the text of a shorter one (true
of the Qwen2 tokenizer with ``skip_special_tokens``); if a tokenizer ever rewrites released text,
nothing more is streamed and ``finish`` reports the mismatch instead of sending wrong text.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

REPLACEMENT = "\ufffd"

OnText = Callable[[str], None]


class TextStream:
    """``push(token_id) -> delta``; ``finish(final_text) -> delta``; deltas join to the text."""

    def __init__(self, decode: Callable[[Sequence[int]], str], on_text: OnText | None = None):
        self.decode, self.on_text = decode, on_text
        self.ids: list[int] = []
        self.released = ""
        self.diverged = False

    def push(self, token_id: int) -> str:
        self.ids.append(int(token_id))
        if self.diverged:
            return ""
        text = self.decode(self.ids)
        if text.endswith(REPLACEMENT):
            return ""  # a character split over tokens: wait for its last byte
        return self._release(text)

    def finish(self, final_text: str) -> str:
        """The rest of ``final_text`` (the completion's decoded text) after the released deltas."""
        return "" if self.diverged else self._release(final_text)

    def _release(self, text: str) -> str:
        if not text.startswith(self.released):
            self.diverged = True
            return ""
        delta = text[len(self.released) :]
        self.released = text
        if delta and self.on_text is not None:
            self.on_text(delta)
        return delta


def tokenizer_stream(tokenizer: Any, on_text: OnText | None) -> TextStream | None:
    """A stream decoding like the MLLM backends' final text (``skip_special_tokens``), or None
    without a callback."""
    if on_text is None:
        return None
    return TextStream(lambda ids: tokenizer.decode(ids, skip_special_tokens=True), on_text)
