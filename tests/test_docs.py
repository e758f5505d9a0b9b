"""The reference pages say each thing once, in the section it belongs to."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = sorted((ROOT / "docs").glob("*.md")) + [ROOT / "README.md"]


@pytest.mark.parametrize("page", PAGES, ids=lambda page: page.name)
def test_no_paragraph_is_written_twice_on_a_page(page):
    paragraphs = [block.strip() for block in re.split(r"\n\s*\n", page.read_text()) if len(block.strip()) > 80]
    repeated = sorted({p.splitlines()[0] for p in paragraphs if paragraphs.count(p) > 1})
    assert repeated == []


def test_what_a_data_file_may_make_vheads_open_is_told_with_the_paths_and_image_limits():
    sections = re.split(r"\n## ", (ROOT / "docs" / "datasets.md").read_text())
    holding = [s.splitlines()[0] for s in sections if "What a data file may make vheads open" in s]
    assert holding == ["Bad records, paths and image limits"]
