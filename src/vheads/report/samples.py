"""Which stored samples the report draws (`pipeline.replay.reload_samples` gets them back)."""

from __future__ import annotations

import numpy as np
import pandas as pd


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
