"""Scoring rules as tables of tricky replies, and the aggregate figures."""

from __future__ import annotations

import math

import pytest

from vheads.data import (
    Sample,
    accuracy_by,
    circular_accuracy,
    extract_count,
    extract_letter,
    extract_yesno,
    pope_metrics,
    score,
    scored_record,
)

OPTIONS = ["a cat", "a dog", "a bird", "a fish"]


@pytest.mark.parametrize(("reply", "letter"), [
    ("B", "B"),
    ("(B)", "B"),
    ("B.", "B"),
    ("B)", "B"),
    ("B. a dog", "B"),
    ("(C) a bird", "C"),
    ("The answer is B", "B"),
    ("The answer is (D).", "D"),
    ("Answer: C", "C"),
    ("answer: A", "A"),
    ("I think it is D, the fish.", "D"),
    ("A", "A"),
    ("A.", "A"),
    ("A dog is sitting on the mat", "B"),
    ("A cat", "A"),
    ("a bird", "C"),
    ("It shows a fish swimming.", "D"),
    ("", None),
    ("I cannot tell.", None),
    ("B or C", None),
    ("E", None),
    ("a cat and a dog", None),
])
def test_extract_letter(reply: str, letter: str | None) -> None:
    assert extract_letter(reply, OPTIONS) == letter


def test_extract_letter_only_accepts_letters_of_the_options() -> None:
    assert extract_letter("C", ["yes", "no"]) is None
    assert extract_letter("No", ["Yes", "No"]) == "B"
    assert extract_letter("No, it is not blurry.", ["Yes", "No"]) == "B"
    assert extract_letter("D") == "D"


@pytest.mark.parametrize(("reply", "answer"), [
    ("Yes", "yes"),
    ("yes.", "yes"),
    ("No", "no"),
    ("no, there is not.", "no"),
    ("NO", "no"),
    ("There is not a kite in the image.", "no"),
    ("Yes, there is a kite. No other objects.", "yes"),
    ("Nope", "yes"),
    ("I do not know", "no"),
    ("", "yes"),
])
def test_extract_yesno_follows_pope(reply: str, answer: str) -> None:
    assert extract_yesno(reply) == answer


@pytest.mark.parametrize(("reply", "count"), [
    ("3", 3),
    ("three", 3),
    ("Three.", 3),
    ("There are 3.", 3),
    ("3 circles", 3),
    ("The answer is 3 .", 3),
    ("In 2 rows there are, the answer is four", 4),
    ("There is one red circle.", 1),
    ("none", 0),
    ("12", 12),
    ("many", None),
    ("", None),
    ("someone", None),
])
def test_extract_count(reply: str, count: int | None) -> None:
    assert extract_count(reply) == count


def sample(scoring: str, answer: str | None, options: list[str] | None = None, **meta: object) -> Sample:
    """A minimal sample that only carries what scoring reads."""
    return Sample(id=str(meta.pop("id", "s")), question="q", text="q", image_fn=lambda: None, answer=answer,
                  options=options, scoring=scoring, question_type=str(meta.pop("question_type", "t")),
                  meta=dict(meta))


@pytest.mark.parametrize(("item", "reply", "correct"), [
    (sample("letter", "B", OPTIONS), "(B) a dog", True),
    (sample("letter", "B", OPTIONS), "a dog", True),
    (sample("letter", "B", OPTIONS), "A", False),
    (sample("yesno", "no"), "No, there is none.", True),
    (sample("yesno", "yes"), "Not at all", False),
    (sample("count", "3"), "There are three.", True),
    (sample("count", "3"), "33", False),
    (sample("exact", "Glass"), " glass. ", True),
    (sample("exact", "red car"), "Red  car!", True),
    (sample("exact", "red car"), "a red car", False),
    (sample("exact", None), "anything", False),
])
def test_score_dispatches_on_the_rule(item: Sample, reply: str, correct: bool) -> None:
    assert score(item, reply) is correct


def test_pope_metrics_from_text_and_bools() -> None:
    labels = ["yes", "yes", "no", "no", "yes"]
    figures = pope_metrics(["Yes", "No.", "no", "yes", True], labels)
    assert figures["accuracy"] == pytest.approx(3 / 5)
    assert figures["precision"] == pytest.approx(2 / 3)
    assert figures["recall"] == pytest.approx(2 / 3)
    assert figures["f1"] == pytest.approx(2 / 3)
    assert figures["yes_ratio"] == pytest.approx(3 / 5)
    assert pope_metrics([False, False], [False, True])["precision"] == 0.0
    assert math.isnan(pope_metrics([], [])["accuracy"])
    with pytest.raises(ValueError):
        pope_metrics(["yes"], [])


def test_pope_metrics_leave_out_labels_that_are_not_yes_or_no() -> None:
    predictions = ["yes", "no", "yes", "no", "yes", "no"]
    labels = ["yes", "no", "no", "yes", "maybe", "2"]
    figures = pope_metrics(predictions, labels)
    assert figures["accuracy"] == pytest.approx(2 / 4)
    assert figures["yes_ratio"] == pytest.approx(2 / 4)
    assert figures["n"] == 4 and figures["left_out"] == 2
    all_odd = pope_metrics(["yes"], ["blue"])
    assert math.isnan(all_odd["accuracy"]) and all_odd["left_out"] == 1


def test_circular_accuracy_needs_every_copy_right() -> None:
    records = [
        scored_record(sample("letter", "A", OPTIONS, id="7", circular_group="7"), "A"),
        scored_record(sample("letter", "C", OPTIONS, id="1000007", circular_group="7"), "C"),
        scored_record(sample("letter", "B", OPTIONS, id="8", circular_group="8"), "B"),
        scored_record(sample("letter", "D", OPTIONS, id="1000008", circular_group="8"), "A"),
        {"id": "9", "correct": True},
    ]
    assert circular_accuracy(records) == pytest.approx(2 / 3)
    assert circular_accuracy([{"id": "1", "meta": {"circular_group": "1"}, "correct": False}]) == 0.0
    assert math.isnan(circular_accuracy([]))


def test_accuracy_by_question_type() -> None:
    records = [
        scored_record(sample("count", "2", question_type="general"), "2"),
        scored_record(sample("count", "2", question_type="general"), "3"),
        scored_record(sample("count", "4", question_type="obj"), "four"),
    ]
    assert accuracy_by(records) == {"general": 0.5, "obj": 1.0}
    assert accuracy_by(records, "answer") == {"2": 0.5, "4": 1.0}
