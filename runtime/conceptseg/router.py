"""The adaptive router: send easy queries straight to SAM 3 (METHOD.md section 2).

The threshold grows with the question's length: ``T = 0.1 * 2 ** (n - 1)`` for ``n`` words
(1 word 0.1, 2 words 0.2, 3 words 0.4, 4 words 0.8, 5 words 1.6). It is left unclipped so that
``T >= 1`` says plainly that the probe can never accept and need not run at all.
"""

from __future__ import annotations

import re

_PARENTHETICAL = re.compile(r"\([^)]*\)")


def strip(question: str) -> str:
    """``question`` without parentheticals ``(...)``, as the benchmark code feeds SAM 3."""
    return _PARENTHETICAL.sub("", question).strip()


def word_count(question: str, *, strip_parentheticals: bool = True) -> int:
    """Whitespace words of ``question``, parentheticals ``(...)`` removed first by default."""
    return len((strip(question) if strip_parentheticals else question).split())


def threshold(question: str, *, strip_parentheticals: bool = True) -> float:
    """Presence threshold for ``question``; raises ``ValueError`` on an empty question."""
    if not question.strip():
        raise ValueError("question is empty: give the concept to segment, e.g. 'red car'")
    n = word_count(question, strip_parentheticals=strip_parentheticals)
    return 0.1 * 2 ** (n - 1)


def needs_probe(threshold_: float) -> bool:
    """Whether a SAM 3 presence probe could accept at this threshold (``T < 1``)."""
    return threshold_ < 1


def accepts(presence: float, threshold_: float, *, inclusive: bool = True) -> bool:
    """Fast path? ``presence >= T`` (``>`` with ``inclusive=False``, as the single-example script);
    never when ``T >= 1``."""
    if not needs_probe(threshold_):
        return False
    return presence >= threshold_ if inclusive else presence > threshold_
