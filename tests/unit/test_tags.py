"""Tag parser: whole-text rules and chunk-split invariance.

Run: .venv/bin/pytest tests/unit/test_tags.py -q
"""

import itertools

import pytest

from conceptseg.tags import StreamParser, TagEvent, coalesce, parse

FULL = (
    "<think>Tile 1 shows a mug.\nThe rule: handles.</think> <rule>mugs with handles</rule>"
    "<check>[10, 20, 110, 220]</check> <bbox>[300, 40, 100, 400]</bbox> <answer>coffee mug</answer>"
)


@pytest.mark.parametrize(
    "text, field, expected",
    [
        (FULL, "think", "Tile 1 shows a mug.\nThe rule: handles."),
        (FULL, "rule", "mugs with handles"),
        (FULL, "check", (10.0, 20.0, 110.0, 220.0)),
        (FULL, "bbox", (100.0, 40.0, 300.0, 400.0)),  # x swapped back into order
        (FULL, "answer", "coffee mug"),
        (FULL, "complete", True),
        ("", "answer", ""),
        ("", "complete", False),
        ("", "rule", None),
        ("", "think", ""),
        ("no tags at all", "bbox", None),
        # case-insensitive tag names
        ("<THINK>a</Think><Answer>Dog</ANSWER>", "think", "a"),
        ("<THINK>a</Think><Answer>Dog</ANSWER>", "answer", "Dog"),
        # think/rule: first closed pair; answer: last closed pair
        ("<rule>one</rule><rule>two</rule>", "rule", "one"),
        ("<answer>cat</answer> <answer>dog</answer>", "answer", "dog"),
        ("<think>x</think><think>y</think>", "think", "x"),
        # answers over lines, whitespace collapsed, one pair of quotes removed
        ("<answer>\n  red\n\t car  \n</answer>", "answer", "red car"),
        ('<answer>"red car"</answer>', "answer", "red car"),
        ("<answer>'mug'</answer>", "answer", "mug"),
        ('<answer>""mug""</answer>', "answer", '"mug"'),
        ("<answer>\"mug'</answer>", "answer", "\"mug'"),
        ("<answer>\u201cmug\u201d</answer>", "answer", "mug"),
        # cut off at the token limit
        ("<think>a</think><answer>red ca", "answer", "red ca"),
        ("<think>a</think><answer>red ca", "complete", False),
        ("<answer>red car</ans", "answer", "red car"),
        ("<answer>red car<", "answer", "red car"),
        ("<answer>red car</ANSWER", "answer", "red car"),
        ("<answer>", "answer", ""),
        ("<answer>", "complete", False),
        ("<think>unfinished", "think", ""),
        # text before <think>, repeated tags, nested opening tags
        ("Sure! <think>t</think><answer>cup</answer>", "answer", "cup"),
        ("<answer>a<answer>b</answer>", "answer", "b"),
        # boxes: floats, signs, extra numbers, too few numbers, garbage
        ("<bbox>[1.5, -2, 3e, 4.25]</bbox>", "bbox", (1.5, -2.0, 3.0, 4.25)),
        ("<bbox>[10, 20, 30, 40, 50]</bbox>", "bbox", (10.0, 20.0, 30.0, 40.0)),
        ("<bbox>[10, 20, 30]</bbox>", "bbox", None),
        ("<bbox>none</bbox>", "bbox", None),
        ("<bbox>(5,6,1,2)</bbox>", "bbox", (1.0, 2.0, 5.0, 6.0)),
        ("<bbox>[1,2,3,4]</bbox><bbox>[9,9,8,8]</bbox>", "bbox", (8.0, 8.0, 9.0, 9.0)),
        ("<bbox>[1,2,3,4]</bbox><bbox>[9,9", "bbox", (1.0, 2.0, 3.0, 4.0)),
        ("<check>[+1, .5, 2., 3]</check>", "check", (1.0, 0.5, 2.0, 3.0)),
        ("<bbox>[1,2,3,4]</bbox>", "check", None),
    ],
)
def test_parse(text, field, expected):
    assert getattr(parse(text), field) == expected, f"{field} of {text!r}"


@pytest.mark.parametrize(
    "text",
    [
        "<",
        "</",
        "<<<>>>",
        "</answer>",
        "<answer></answer>",
        "\x00<bbox>[",
        "<bbox>[nan, inf, 1, 2]</bbox>",
        "<think>" * 50,
        "<answer>" + "x" * 10000,
        "\ud800 surrogate",
        "<bbox>[1e999, 2, 3, 4]</bbox>",
    ],
)
def test_parse_never_raises(text):
    answer = parse(text)
    assert isinstance(answer.answer, str)


def _events(chunks):
    parser = StreamParser()
    events = [e for chunk in chunks for e in parser.feed(chunk)] + parser.flush()
    return coalesce(events), parser.result()


def _splits(text, parts):
    """Every split of ``text`` into ``parts`` non-empty pieces."""
    for cuts in itertools.combinations(range(1, len(text)), parts - 1):
        bounds = (0, *cuts, len(text))
        yield [text[a:b] for a, b in itertools.pairwise(bounds)]


STREAM_TEXTS = [
    FULL,
    "pre <think>a<b</think><Answer>'x y'</answer",
    "<answer>red car</ans",
    "<ans<answer>q</answer><",
    "<<think>>",
]


@pytest.mark.parametrize("text", STREAM_TEXTS)
def test_stream_every_two_and_three_way_split_matches_whole(text):
    whole_events, whole_result = _events([text])
    assert whole_result == parse(text)
    splits = list(_splits(text, 2))
    if len(text) <= 40:
        splits += list(_splits(text, 3))
    for chunks in splits:
        events, result = _events(chunks)
        assert events == whole_events, f"events differ for split {chunks!r}"
        assert result == whole_result, f"result differs for split {chunks!r}"


def test_stream_char_by_char_matches_whole():
    events, result = _events(list(FULL))
    assert events == _events([FULL])[0]
    assert result == parse(FULL)


def test_stream_events_name_tags_and_text():
    events, _ = _events(["<think>ab</th", "ink> <answer>cup</answer>"])
    assert events == [
        TagEvent("open", "think"),
        TagEvent("text", "think", "ab"),
        TagEvent("close", "think"),
        TagEvent("text", None, " "),
        TagEvent("open", "answer"),
        TagEvent("text", "answer", "cup"),
        TagEvent("close", "answer"),
    ]


def test_stream_holds_back_partial_tag_until_decided():
    parser = StreamParser()
    assert parser.feed("<answer>cup</an") == [
        TagEvent("open", "answer"),
        TagEvent("text", "answer", "cup"),
    ]
    assert parser.feed("swer>") == [TagEvent("close", "answer")]
    assert "answer" in parser.closed
    parser = StreamParser()
    parser.feed("a <")
    assert parser.flush() == [TagEvent("text", None, "<")]
