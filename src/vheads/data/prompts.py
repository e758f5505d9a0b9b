"""The user-message texts each benchmark's reference code builds (LLaVA / ViP-LLaVA), in one place."""

from __future__ import annotations

from collections.abc import Sequence

from vheads.data.visual_prompt import Box

SHORT_ANSWER = "Answer the question using a single word or phrase."
LETTER_ANSWER = "Answer with the option's letter from the given choices directly."
LETTER_ANSWER_CN = "请直接回答选项字母。"
QBENCH_CHOOSE = "Choose between one of the options as follows:"
BOX_VISUAL = "The exemplary object is within the rectangle."
BOX_PLAIN = "The exemplary object is at {coords}."
LETTERS = "ABCDEFGHIJ"


def with_short_answer(text: str) -> str:
    """`text` followed by LLaVA's short-answer instruction, unless it already carries it."""
    return text if SHORT_ANSWER in text else f"{text}\n{SHORT_ANSWER}"


def option_lines(options: Sequence[str]) -> str:
    """'A. first\\nB. second ...' as LLaVA lists choices."""
    return "\n".join(f"{LETTERS[i]}. {option}" for i, option in enumerate(options))


def multiple_choice(question: str, options: Sequence[str], hint: str | None = None,
                    suffix: str = LETTER_ANSWER) -> str:
    """LLaVA's MMBench / SEED-Bench prompt: [hint + newline] + question + options + letter instruction."""
    head = f"{hint}\n{question}" if hint else question
    return f"{head}\n{option_lines(options)}\n{suffix}"


def qbench(question: str, options: Sequence[str]) -> str:
    """LLaVA's Q-Bench A1 prompt: question, 'Choose between...', then one 'A. option' line each."""
    return f"{question}\n{QBENCH_CHOOSE}\n{option_lines(options)}\n"


def box_coordinates(box: Box, size: tuple[int, int]) -> str:
    """The box as normalised text coordinates, '[x1, y1, x2, y2]' with two decimals in [0, 1]."""
    width, height = size
    scaled = (box[0] / width, box[1] / height, box[2] / width, box[3] / height)
    return "[" + ", ".join(f"{min(max(v, 0.0), 1.0):.2f}" for v in scaled) + "]"


def pointqa(question: str, style: str, box: Box, size: tuple[int, int]) -> str:
    """PointQA text per prompt style: `visual` (ViP-LLaVA's), `plain` (box as text) or `none` (no box)."""
    if style == "visual":
        return f"{question} {BOX_VISUAL}\n{SHORT_ANSWER}"
    if style == "plain":
        return f"{question} {BOX_PLAIN.format(coords=box_coordinates(box, size))}\n{SHORT_ANSWER}"
    return f"{question}\n{SHORT_ANSWER}"
