"""Which stored samples the report draws, and how to get them back from the dataset a run was made from."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd

from vheads.data import Sample, load_dataset

DATASET_FIELDS = ("data", "images", "split", "question_type", "prompt_style", "limit", "seed", "max_pixels")


def pick_samples(frame: pd.DataFrame, n: int) -> pd.DataFrame:
    """Up to `n` correct and `n` wrong samples (unscored ones when nothing is scored), spread over the run.

    The choice is deterministic: evenly spaced in sample-id order, so two reports of one run show the same.
    """
    if n <= 0 or frame.empty:
        return frame.iloc[0:0]
    frame = frame.sort_values("sample_id")
    scored = frame["correct"].notna()
    groups = [frame[scored & frame["correct"].astype("boolean").fillna(False)],
              frame[scored & ~frame["correct"].astype("boolean").fillna(True)]]
    if not scored.any():
        groups = [frame]
        n *= 2
    picked = [g.iloc[np.unique(np.linspace(0, len(g) - 1, min(n, len(g))).round().astype(int))] for g in groups
              if len(g)]
    return pd.concat(picked) if picked else frame.iloc[0:0]


def reload_samples(run: Mapping[str, Any], ids: Sequence[str]) -> list[Sample]:
    """The samples `ids` of a run, loaded again from its dataset with the run's own options (in `ids` order).

    Raises DataError when the dataset cannot be loaded; ids it no longer holds are left out.
    """
    config = run.get("config") or {}
    options = {key: config.get(key) for key in DATASET_FIELDS if config.get(key) is not None}
    dataset = load_dataset(config.get("dataset") or run["dataset"], **options)
    by_id = {s.id: s for s in dataset.samples}
    return [by_id[i] for i in ids if i in by_id]
