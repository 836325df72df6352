"""Router thresholds. Run: .venv/bin/pytest tests/unit/test_router.py -q"""

import pytest

from conceptseg import router


@pytest.mark.parametrize(
    "question, expected",
    [
        ("car", 0.1),
        ("red car", 0.2),
        ("the red car", 0.4),
        ("the big red car", 0.8),
        ("the big red sports car", 1.6),  # unclipped on purpose: 5+ words never accept
        ("  car   ", 0.1),
        ("car (the vehicle)", 0.1),  # parentheticals are removed before counting
        ("red (shiny) car (left)", 0.2),
        ("(only a note)", 0.05),  # zero words left: 0.1 * 2 ** -1
    ],
)
def test_threshold(question, expected):
    assert router.threshold(question) == pytest.approx(expected)


def test_threshold_can_keep_parentheticals():
    assert router.threshold("car (the vehicle)", strip_parentheticals=False) == pytest.approx(0.4)


@pytest.mark.parametrize("question", ["", "   ", "\n\t"])
def test_empty_question_raises(question):
    with pytest.raises(ValueError, match="question is empty"):
        router.threshold(question)


@pytest.mark.parametrize(
    "presence, question, inclusive, expected",
    [
        (0.2, "red car", True, True),  # boundary: >= accepts
        (0.2, "red car", False, False),  # single-example script's >
        (0.19, "red car", True, False),
        (0.99, "the big red car", True, True),
        (1.0, "a very big red car", True, False),  # T = 1.6 can never accept
    ],
)
def test_accepts(presence, question, inclusive, expected):
    t = router.threshold(question)
    assert router.accepts(presence, t, inclusive=inclusive) is expected


@pytest.mark.parametrize(
    "question, expected",
    [("car", True), ("the big red car", True), ("the big red sports car", False)],
)
def test_needs_probe(question, expected):
    assert router.needs_probe(router.threshold(question)) is expected
