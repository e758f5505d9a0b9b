"""How a free-form question with a known answer is scored, shared by the generic loaders."""

from __future__ import annotations

import re

from vheads.data.prompts import LETTERS

_OPTION_LINE = re.compile(r"^([A-J])\. (.+)$", re.MULTILINE)


def options_in_text(text: str) -> list[str] | None:
    """Choices written into a prompt as LLaVA does ('A. x' lines, starting at A), or None."""
    found = _OPTION_LINE.findall(text)
    options: list[str] = []
    for letter, option in found:
        if letter != LETTERS[len(options)]:
            break
        options.append(option.strip())
    return options if len(options) >= 2 else None


def scoring_for(answer: str | None, options: list[str] | None) -> str:
    """'letter' for a letter among the options, 'yesno' for yes/no, 'count' for a whole number, else 'exact'."""
    if answer is None:
        return "exact"
    if options and answer in LETTERS[: len(options)]:
        return "letter"
    if answer.strip().lower() in ("yes", "no"):
        return "yesno"
    if answer.strip().isdigit():
        return "count"
    return "exact"


def letter_answer(answer: str | None, options: list[str] | None) -> str | None:
    """The answer as an option letter when it names one of the options by its text, else unchanged."""
    if answer is None or not options or answer in LETTERS[: len(options)]:
        return answer
    folded = [o.strip().lower() for o in options]
    key = answer.strip().lower()
    return LETTERS[folded.index(key)] if folded.count(key) == 1 else answer
