"""Incremental detokenization: deltas join to the final text, split characters are held back.

Run: .venv/bin/pytest tests/unit/test_textstream.py -q
"""

from __future__ import annotations

import itertools

import pytest

from conceptseg.textstream import TextStream

PIECES = {1: b"<think>", 2: b"a mug", 3: "é".encode()[:1], 4: "é".encode()[1:], 5: b" ", 6: "🙂".encode()[:2],
          7: "🙂".encode()[2:], 8: b"</think>", 0: b""}  # fmt: skip


def decode(ids):
    return b"".join(PIECES[i] for i in ids).decode("utf-8", errors="replace")


def test_split_characters_are_held_until_complete():
    got = []
    stream = TextStream(decode, got.append)
    deltas = [stream.push(i) for i in (1, 3, 4, 5, 6, 7)]
    assert deltas == ["<think>", "", "é", " ", "", "🙂"]
    assert got == ["<think>", "é", " ", "🙂"]  # empty deltas are not sent
    assert "\ufffd" not in "".join(got)


@pytest.mark.parametrize("ids", list(itertools.permutations([1, 2, 3, 4, 5, 8], 4))[::36])
def test_deltas_join_to_the_final_text(ids):
    got = []
    stream = TextStream(decode, got.append)
    for i in ids:
        stream.push(i)
    final = decode(ids)
    stream.finish(final)
    assert "".join(got) == final


def test_truncated_character_is_released_by_finish():
    got = []
    stream = TextStream(decode, got.append)
    for i in (2, 3):  # generation stopped in the middle of "é"
        stream.push(i)
    assert got == ["a mug"]
    assert stream.finish(decode([2, 3])) == "\ufffd"  # what the final text holds, as is
    assert "".join(got) == decode([2, 3])


def test_a_tokenizer_that_rewrites_released_text_stops_the_stream():
    texts = iter(["ab", "aXc", "aXcd"])
    got = []
    stream = TextStream(lambda ids: next(texts), got.append)
    stream.push(1)
    assert stream.push(2) == "" and stream.diverged
    assert stream.push(3) == "" and stream.finish("aXcd") == ""
    assert got == ["ab"]  # never wrong text: the final result carries the whole text
