"""Tag parser: whole-text rules and chunk-split invariance.

Run: .venv/bin/pytest tests/unit/test_tags.py -q
"""


import pytest

from conceptseg.tags import parse

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
