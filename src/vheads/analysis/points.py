"""`Point`: one point of a pruning curve, the head set it changes and the stored run that measures it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from vheads.analysis.visual import head_label
from vheads.heads import Head

# The selector of the points every selector of a curve shares (no head removed; keep-only: all or none kept).
BASELINE = "none"


@dataclass(frozen=True)
class Point:
    """One point of a curve: the heads ablated (`heads`), and the run that measures it (`name`).

    `mode` is the ablation mode; keep-only points (`kept` not None) make every head but `kept` image-blind or
    flow-blind, and K counts the kept heads; FastV points (`fastv` = (layer K, share R)) ablate no head and K
    is FastV's layer."""

    selector: str
    k: int
    seed: int | None
    heads: list[Head]
    name: str
    mode: str = "zero"
    kept: list[Head] | None = None
    fastv: tuple[int, float] | None = None

    def tags(self, from_run: str) -> dict[str, Any]:
        """What runs.tags records for this point."""
        tags = {"selector": self.selector, "k": self.k, "seed": self.seed, "from_run": from_run,
                "heads": head_label(self.heads), "mode": self.mode}
        if self.kept is not None:
            tags["kept"] = head_label(self.kept)
        if self.fastv is not None:
            tags["fastv_layer"], tags["fastv_keep"] = self.fastv
        return tags
