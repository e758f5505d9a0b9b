"""The loaded dataset and the plumbing every loader shares: the request, lazy entries, and sample selection."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from vheads.data.sample import BadSample, DataError, Sample
from vheads.data.skips import DUPLICATE_ID, BadRecord, Skip, skip_from, summarize


@dataclass(frozen=True)
class Request:
    """What the user asked `load_dataset` for, handed unchanged to the loader."""

    data: Path | None = None
    images: Path | None = None
    split: str | None = None
    question_type: str | None = None
    prompt_style: str | None = None
    limit: int | None = None
    seed: int = 0
    options: dict[str, Any] = field(default_factory=dict)

    def image_root(self) -> Path:
        """Folder that relative image paths start from: `images`, else the data file's folder."""
        if self.images is not None:
            return self.images
        if self.data is None:
            return Path(".")
        return self.data if self.data.is_dir() else self.data.parent


@dataclass(frozen=True)
class Entry:
    """One record, parsed only as far as needed to filter it; `make` finishes it or raises `BadSample`.

    `group` ties records that must be kept or dropped together (MMBench circular copies).
    """

    file: str
    record: str
    make: Callable[[], Sample]
    group: str | None = None


@dataclass
class Parsed:
    """A loader's answer: its entries and skips in file order, the split they belong to, and the file read."""

    items: list[Entry | Skip]
    split: str | None
    source: str


@dataclass
class Dataset:
    """Samples ready to run, plus every record that was skipped and why.

    Images load lazily: `Sample.image_fn` can still raise `BadSample` when a file that passed the cheap
    header check at load time fails to decode; the pipeline catches `BadSample` per sample and skips it.
    """

    name: str
    samples: list[Sample]
    split: str | None = None
    skipped: list[Skip] = field(default_factory=list)
    metrics: tuple[str, ...] = ()  # the loader's run metrics (`scoring.RUN_METRICS`)

    def __len__(self) -> int:
        return len(self.samples)

    def __iter__(self) -> Iterator[Sample]:
        return iter(self.samples)

    def __getitem__(self, index: int) -> Sample:
        return self.samples[index]

    def skip_summary(self) -> dict[str, int]:
        """Counts of skipped records by reason (e.g. {'missing image': 3})."""
        return summarize(self.skipped)


def _groups(entries: list[Entry]) -> list[list[int]]:
    """Indices of entries grouped by `group` (each ungrouped entry alone), in file order of first member."""
    order: dict[str, list[int]] = {}
    for i, entry in enumerate(entries):
        order.setdefault(entry.group if entry.group is not None else f"\0{i}", []).append(i)
    return list(order.values())


def _make(entry: Entry, skipped: list[Skip], seen: set[str]) -> Sample | None:
    """Build one sample, or record why it was skipped (a repeated id is skipped too)."""
    try:
        sample = entry.make()
        if sample.id in seen:
            raise BadRecord(DUPLICATE_ID, sample.id)
        seen.add(sample.id)
        return sample
    except BadSample as error:
        skipped.append(skip_from(entry.file, entry.record, error))
        return None


def select(items: Iterable[Entry | Skip], limit: int | None, seed: int) -> tuple[list[Sample], list[Skip]]:
    """Build the samples: all of them, or `limit` questions drawn at random with `seed` (kept in file order).

    A group (a MMBench question and its circular copies) counts as one question and is kept whole;
    entries are built only when drawn, so a small `limit` on a large file checks few images.
    """
    skipped: list[Skip] = []
    entries: list[Entry] = []
    for item in items:
        if isinstance(item, Skip):
            skipped.append(item)
        else:
            entries.append(item)
    groups = _groups(entries)
    if limit is not None and limit < len(groups):
        order = [int(g) for g in np.random.default_rng(seed).permutation(len(groups))]
    else:
        order = list(range(len(groups)))
    chosen: list[tuple[int, Sample]] = []
    seen: set[str] = set()
    taken = 0
    for g in order:
        if limit is not None and taken >= limit:
            break
        built = [(i, _make(entries[i], skipped, seen)) for i in groups[g]]
        kept = [(i, s) for i, s in built if s is not None]
        if kept:
            chosen.extend(kept)
            taken += 1
    chosen.sort(key=lambda pair: pair[0])
    return [s for _, s in chosen], skipped


@dataclass(frozen=True)
class Loader:
    """One benchmark behind the common interface: a name, a help line, and the function that parses it.

    `options` names the extra keyword arguments `load_dataset` passes through to this loader; `metrics` names the
    benchmark's own run metrics (`scoring.RUN_METRICS`) a run reports beside its accuracy, so nothing outside
    `data/` needs to know which benchmark has which.
    """

    name: str
    describe: str
    parse: Callable[[Request], Parsed]
    options: tuple[str, ...] = ()
    metrics: tuple[str, ...] = ()


def choice(value: str | None, allowed: Iterable[str], what: str, default: str | None,
           aliases: dict[str, str] | None = None) -> str | None:
    """`value` checked against `allowed` (after `aliases`), or `default` when None; `DataError` otherwise."""
    if value is None:
        return default
    key = value.strip().lower()
    key = (aliases or {}).get(key, key)
    allowed = tuple(allowed)
    if key not in allowed:
        raise DataError(f"unknown {what} {value!r}; choose one of: {', '.join(allowed)}")
    return key
