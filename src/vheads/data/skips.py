"""Skipped records: why one record could not be used, logged once and counted, never fatal."""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field

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
OUTSIDE_IMAGES = "image outside --images"
TOO_LARGE = "image too large"

SHOWN_PER_REASON = 3


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


@dataclass
class SkipLog:
    """Logs skips without burying the output: the first `shown` per reason as warnings, the rest at info level
    (listed with --verbose), then one warning line per reason with its count (`close`)."""

    logger: logging.Logger = log
    shown: int = SHOWN_PER_REASON
    counts: Counter[str] = field(default_factory=Counter)

    def add(self, reason: str, line: str) -> None:
        """Log one skip: a warning while its reason has been seen at most `shown` times, info after."""
        self.counts[reason] += 1
        self.logger.log(logging.WARNING if self.counts[reason] <= self.shown else logging.INFO, line)

    def close(self) -> None:
        """One warning line per reason that had more skips than were shown."""
        for reason, n in self.counts.most_common():
            if n > self.shown:
                self.logger.warning("%s records skipped: %s (the first %d are listed above; --verbose lists "
                                    "them all)", f"{n:,}", reason, self.shown)


def report(skips: Iterable[Skip]) -> None:
    """Log a loader's skips summarised by reason (see `SkipLog`)."""
    summary = SkipLog()
    for skip in skips:
        summary.add(skip.reason, skip.line())
    summary.close()


def summarize(skips: Iterable[Skip]) -> dict[str, int]:
    """Counts of skipped records by reason, most frequent first."""
    return dict(Counter(s.reason for s in skips).most_common())
