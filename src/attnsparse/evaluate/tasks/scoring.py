"""Answer extraction and exact-match scoring, one rule per answer kind (written down in docs/tasks.md)."""

from __future__ import annotations

import re
from collections.abc import Sequence


def numbers(text: str) -> list[str]:
    """Every maximal run of digits, in order."""
    return re.findall(r"\d+", text)


def names(text: str) -> list[str]:
    """Every whole word of exactly five capital letters (the variable names of variable-tracking), in order."""
    return re.findall(r"(?<![A-Za-z])[A-Z]{5}(?![A-Za-z])", text)


def words(text: str) -> list[str]:
    """Every run of letters, lower-cased, in order."""
    return re.findall(r"[a-z]+", text.lower())


def first_is(found: Sequence[str], answers: Sequence[str]) -> bool:
    """The single answer is the first item found (other text around it is allowed)."""
    return bool(found) and found[0] == answers[0]


def all_present(found: Sequence[str], answers: Sequence[str]) -> bool:
    """Every required answer is among the items found (any order; extra items are allowed)."""
    return set(answers) <= set(found)
