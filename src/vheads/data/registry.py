"""The dataset registry: one small loader per benchmark, all reached through `load_dataset`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from vheads.data.dataset import Dataset, Loader, Request, select
from vheads.data.images import DEFAULT_MAX_PIXELS, pixel_cap
from vheads.data.loaders import hf, jsonl, mmbench, pointqa, pope, qbench, refcoco, seedbench, shapes
from vheads.data.sample import DataError
from vheads.data.skips import report, summarize

_LOADERS: dict[str, Loader] = {}


def register(loader: Loader) -> None:
    """Add (or replace) a loader under its name."""
    _LOADERS[loader.name] = loader


for _module in (pointqa, pope, mmbench, seedbench, qbench, jsonl, hf, shapes, refcoco):
    register(_module.LOADER)


def list_datasets() -> list[str]:
    """Names `load_dataset` accepts, sorted."""
    return sorted(_LOADERS)


def describe_dataset(name: str) -> str:
    """The one-paragraph help text of a loader (for `--help`)."""
    return _loader(name).describe


def _loader(name: str) -> Loader:
    """The registered loader, or a `DataError` that lists the known names."""
    try:
        return _LOADERS[name.strip().lower()]
    except KeyError:
        raise DataError(f"unknown dataset {name!r}; known: {', '.join(list_datasets())}") from None


def load_dataset(name: str, data: str | Path | None = None, images: str | Path | None = None,
                 split: str | None = None, question_type: str | None = None,
                 prompt_style: str | None = None, limit: int | None = None, seed: int = 0,
                 max_pixels: int | None = DEFAULT_MAX_PIXELS, **options: Any) -> Dataset:
    """Load a benchmark by name into samples, skipping records that cannot be used (logged summarised by reason).

    `data` is the benchmark file (or folder); `images` the folder relative image paths start from
    (default: the data file's folder); a relative path that leaves it is skipped, an absolute one is used as
    given. An image with more than `max_pixels` pixels (read from its header; None: no cap) is skipped.
    `limit` draws that many questions at random with `seed` (a MMBench question with its circular copies
    counts once). Extra keyword `options` go to the
    loader (see each loader's help). Raises `DataError` for unknown names or options, a missing or
    empty file, or a file with no usable record.
    """
    loader = _loader(name)
    if limit is not None and limit < 0:
        raise DataError(f"limit must be >= 0, got {limit}")
    if seed < 0:
        raise DataError(f"seed must be >= 0, got {seed}")
    unknown = sorted(set(options) - set(loader.options))
    if unknown:
        accepted = ", ".join(loader.options) or "none"
        raise DataError(f"dataset {loader.name!r} does not take option(s) {', '.join(unknown)}; accepted: {accepted}")
    request = Request(
        data=Path(data).expanduser() if data is not None else None,
        images=Path(images).expanduser() if images is not None else None,
        split=split, question_type=question_type, prompt_style=prompt_style,
        limit=limit, seed=seed, options=dict(options),
    )
    if max_pixels is not None and max_pixels < 1:
        raise DataError(f"max_pixels must be >= 1, got {max_pixels}")
    with pixel_cap(max_pixels):
        parsed = loader.parse(request)
        samples, skipped = select(parsed.items, limit, seed)
    report(skipped)
    if not samples and limit != 0:
        if skipped:
            counts = ", ".join(f"{n} {reason}" for reason, n in summarize(skipped).items())
            raise DataError(f"{parsed.source}: no valid record ({counts})")
        wanted = ", ".join(f"{k}={v}" for k, v in (("split", split), ("question_type", question_type)) if v)
        raise DataError(f"{parsed.source}: no record" + (f" matches {wanted}" if wanted else "s"))
    return Dataset(name=loader.name, samples=samples, split=parsed.split, skipped=skipped, metrics=loader.metrics)
