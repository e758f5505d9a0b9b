"""Skipped records: why one record could not be used, logged once and counted, never fatal."""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass

from vheads.data.sample import BadSample

log = logging.getLogger("vheads.data")

MISSING_FIELD = "missing field"
BAD_FIELD = "bad field"
BAD_JSON = "bad JSON"
MISSING_IMAGE = "missing image"
CORRUPT_IMAGE = "corrupt image"
BAD_BASE64 = "bad base64"
BOX_OUTSIDE = "box outside image"
BAD_RECORD = "bad record"
DUPLICATE_ID = "duplicate id"


class BadRecord(BadSample):
    """A `BadSample` with a short reason (counted in summaries); its text reads "reason (detail)"."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason} ({detail})" if detail else reason)
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class Skip:
    """One record a loader left out: the file, the record (its id or line), the short reason and the detail."""

    file: str
    record: str
    reason: str
    detail: str = ""

    def line(self) -> str:
        """The one warning line that names file and record."""
        detail = f" ({self.detail})" if self.detail else ""
        return f"skipped {self.file} record {self.record}: {self.reason}{detail}"


def skip_from(file: str, record: str, error: BadSample) -> Skip:
    """Turn a `BadSample` raised for one record into a `Skip` (plain `BadSample`s count as 'bad record')."""
    if isinstance(error, BadRecord):
        return Skip(file, record, error.reason, error.detail)
    return Skip(file, record, BAD_RECORD, str(error))


def warn(skip: Skip) -> None:
    """Log the skip as exactly one warning line on the `vheads.data` logger."""
    log.warning(skip.line())


def summarize(skips: Iterable[Skip]) -> dict[str, int]:
    """Counts of skipped records by reason, most frequent first."""
    return dict(Counter(s.reason for s in skips).most_common())
