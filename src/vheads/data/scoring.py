"""Scoring: pull the answer out of a model's reply by each benchmark's rule, then aggregate.

Rules: `letter` (MMBench/SEED/Q-Bench option letter, or the option's text echoed back), `yesno`
(POPE/LLaVA), `count` (PointQA/ShapesQA, digits or number words) and `exact` (normalised match).
"""

from __future__ import annotations

import math
import re
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from vheads.data.prompts import LETTERS
from vheads.data.sample import Sample

NUMBER_WORDS = {
    "zero": 0, "none": 0, "one": 1, "two": 2, "three": 3, "four": 4, "five": 5, "six": 6, "seven": 7,
    "eight": 8, "nine": 9, "ten": 10, "eleven": 11, "twelve": 12, "thirteen": 13, "fourteen": 14,
    "fifteen": 15, "sixteen": 16, "seventeen": 17, "eighteen": 18, "nineteen": 19, "twenty": 20,
}
_MMBENCH_PUNCT = str.maketrans({c: " " for c in ".()[],:;!*#{}"})
_NUMBER = re.compile(r"\b(\d+|" + "|".join(NUMBER_WORDS) + r")\b", re.IGNORECASE)
_ANSWER_IS = re.compile(r"answer\s*(?:is|:)\s*:?\s*", re.IGNORECASE)


def _letters(options: Sequence[str] | None) -> str:
    """The valid option letters (A-D when the options are unknown)."""
    return LETTERS[: len(options)] if options else LETTERS[:4]


def _explicit_letter(text: str, letters: str) -> str | None:
    """A letter given in an unambiguous form: alone ('B', '(B)', 'B.'), leading ('B. dog'), or 'answer is B'."""
    pattern = f"[{letters}]"
    alone = re.fullmatch(rf"[(\[]?({pattern})[)\].:,]?\.?", text)
    if alone:
        return alone.group(1)
    leading = re.match(rf"[(\[]?({pattern})(?:[)\].:]|\s*[-–—]\s)", text)
    if leading:
        return leading.group(1)
    stated = re.search(rf"(?i:answer(?:\s+is)?|option|choice)\s*[:：]?\s*[(\[]?({pattern})(?![\w])", text)
    return stated.group(1) if stated else None


def _token_letter(text: str, letters: str) -> str | None:
    """MMBench's rule: the one option letter among the whitespace tokens; a lone 'A' in a longer reply is an article."""
    tokens = text.translate(_MMBENCH_PUNCT).split()
    found = {t for t in tokens if len(t) == 1 and t in letters}
    if len(found) != 1:
        return None
    letter = found.pop()
    return None if letter == "A" and len(tokens) > 3 else letter


def _text_letter(text: str, options: Sequence[str]) -> str | None:
    """The option whose text the reply names: the whole reply, else a unique whole-word occurrence."""
    folded = text.strip().strip(".").strip().lower()
    exact = [i for i, option in enumerate(options) if option.strip().lower() == folded]
    if len(exact) == 1:
        return LETTERS[exact[0]]
    hits = [
        i for i, option in enumerate(options)
        if option.strip() and re.search(rf"(?<!\w){re.escape(option.strip().lower())}(?!\w)", folded)
    ]
    return LETTERS[hits[0]] if len(hits) == 1 else None


def extract_letter(prediction: str, options: Sequence[str] | None = None) -> str | None:
    """The option letter a reply chooses, or None when it names none or several.

    Tried in order: an explicit letter ('B', '(B)', 'B.', 'B) dog', 'The answer is B', 'Answer: B'),
    MMBench's token rule (one bare letter among the words; a lone 'A' in a reply of more than three
    words is read as the article), then the text of exactly one option echoed back.
    """
    text = prediction.strip()
    if not text:
        return None
    letters = _letters(options)
    found = _explicit_letter(text, letters) or _token_letter(text, letters)
    if found is None and options:
        found = _text_letter(text, options)
    return found


def extract_yesno(prediction: str) -> str:
    """'yes' or 'no' by POPE's rule: before the first '.', commas removed, any word 'no'/'not' means no.

    Words are compared case-insensitively ('NO' is no), a small widening of LLaVA's 'No'/'no'/'not'.
    """
    head = prediction.split(".", 1)[0].replace(",", "")
    return "no" if any(word.lower() in ("no", "not") for word in head.split()) else "yes"


def extract_count(prediction: str) -> int | None:
    """The number a reply gives: after 'answer is' when present, else the first digits or number word."""
    text = prediction.strip()
    stated = _ANSWER_IS.search(text)
    for part in ((text[stated.end():],) if stated else ()) + (text,):
        match = _NUMBER.search(part)
        if match:
            word = match.group(1).lower()
            return int(word) if word.isdigit() else NUMBER_WORDS[word]
    return None


def normalize(text: str) -> str:
    """Lower case, outer punctuation and quotes stripped, inner whitespace collapsed."""
    return " ".join(text.strip().strip(".,!?;:'\"`").strip().lower().split())


def score(sample: Sample, prediction: str) -> bool:
    """Whether `prediction` answers `sample` correctly under its `scoring` rule (False without an answer)."""
    if sample.answer is None:
        return False
    answer = sample.answer.strip()
    if sample.scoring == "letter":
        return extract_letter(prediction, sample.options) == answer.upper()
    if sample.scoring == "yesno":
        return extract_yesno(prediction) == answer.lower()
    if sample.scoring == "count" and answer.isdigit():
        return extract_count(prediction) == int(answer)
    return normalize(prediction) == normalize(answer)


def scored_record(sample: Sample, prediction: str) -> dict[str, Any]:
    """The row aggregates work on: id, question type, circular group, answer, prediction, correct."""
    return {
        "id": sample.id,
        "dataset": sample.dataset,
        "question_type": sample.question_type,
        "circular_group": sample.meta.get("circular_group"),
        "answer": sample.answer,
        "prediction": prediction,
        "correct": score(sample, prediction),
    }


def _is_yes(value: bool | str) -> bool:
    """A prediction or label as a yes/no bool (text goes through the POPE rule)."""
    return value if isinstance(value, bool) else extract_yesno(value) == "yes"


def yesno_label(label: bool | str | None) -> bool | None:
    """A POPE label as True (yes) / False (no), None when it is neither (such items have no POPE figures)."""
    if isinstance(label, bool):
        return label
    text = str(label).strip().lower().rstrip(".")
    return {"yes": True, "no": False}.get(text)


def pope_metrics(predictions: Sequence[bool | str], labels: Sequence[bool | str]) -> dict[str, float]:
    """POPE's figures over the items labelled yes or no: accuracy, precision, recall and F1 of 'yes', the share of
    'yes' predictions, n (items counted) and left_out (items whose label is neither yes nor no)."""
    if len(predictions) != len(labels):
        raise ValueError(f"{len(predictions)} predictions but {len(labels)} labels")
    pairs = [(_is_yes(p), yesno_label(t)) for p, t in zip(predictions, labels, strict=True)]
    kept = [(p, t) for p, t in pairs if t is not None]
    tp = sum(p and t for p, t in kept)
    fp = sum(p and not t for p, t in kept)
    tn = sum(not p and not t for p, t in kept)
    fn = sum(not p and t for p, t in kept)
    n = len(kept)
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    return {
        "accuracy": (tp + tn) / n if n else math.nan,
        "precision": precision,
        "recall": recall,
        "f1": 2 * precision * recall / (precision + recall) if precision + recall else 0.0,
        "yes_ratio": (tp + fp) / n if n else math.nan,
        "n": float(n),
        "left_out": float(len(pairs) - n),
    }


def _group_of(record: Mapping[str, Any]) -> str:
    """A record's circular group: its `circular_group` (or meta's), else its own id."""
    group = record.get("circular_group")
    if group is None:
        group = (record.get("meta") or {}).get("circular_group")
    return str(group if group is not None else record["id"])


def circular_accuracy(records: Iterable[Mapping[str, Any]]) -> float:
    """MMBench CircularEval: a question is right only if every rotated copy of it is right."""
    groups: dict[str, bool] = {}
    for record in records:
        key = _group_of(record)
        groups[key] = groups.get(key, True) and bool(record["correct"])
    return sum(groups.values()) / len(groups) if groups else math.nan


def accuracy_by(records: Iterable[Mapping[str, Any]], key: str = "question_type") -> dict[str, float]:
    """Accuracy per value of `key` (e.g. per question type), in order of first appearance."""
    totals: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for record in records:
        bucket = totals[str(record.get(key))]
        bucket[0] += bool(record["correct"])
        bucket[1] += 1
    return {value: right / n for value, (right, n) in totals.items()}


RUN_METRICS: dict[str, Callable[[Sequence[str], Sequence[str]], dict[str, float]]] = {"pope": pope_metrics}
"""Benchmark metrics over a whole run, by the name a loader lists in `Loader.metrics`: each takes the run's
predictions and answers and returns named figures (`n` items counted and `left_out` items, where it has them)."""


def run_metrics(names: Sequence[str], predictions: Sequence[str],
                answers: Sequence[str]) -> dict[str, dict[str, float]]:
    """Each named run metric of `RUN_METRICS` over a run's scored predictions and answers."""
    return {name: RUN_METRICS[name](predictions, answers) for name in names}

