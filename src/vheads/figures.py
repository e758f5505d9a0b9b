"""The per-head figures, declared once: what the recorder hands over, the store keeps and the listings show.

Each `Figure` names one number per sample and head (DESIGN.md, Metrics) and says how it is stored, how it reduces
over samples and how it is listed. `HeadFigures` (capture), the writer, the `head_stats` columns (old stores gain
new ones when opened for writing), the per-head means (`Store.head_means`) and the head ranking with its headers
and legend (`head_table`, `vheads heads`, the report) all read `FIGURES`, at call time. Its math is a function of
`metrics`; the recorder computes it. Adding a figure is one line below plus that computation (docs/measures.md).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Figure:
    """One per-head figure: its name (HeadFigures attribute, head_stats column, `add_batch` keyword), its store
    type, its reduction over samples, and its short label and help for listings."""

    name: str  # HeadFigures attribute, head_stats column, `Store.add_batch` keyword, `head_means` column
    label: str  # short header in listings (`vheads heads`, the report)
    help: str  # what the listed per-head value is, for the legend under a listing
    sql_type: str = "REAL"  # the head_stats column type
    reduce: str = "avg"  # the SQL aggregate that turns a head's samples into one value (NULLs left out)
    listed: str | None = None  # its column in the head ranking (`head_table`), None: not listed
    derived: str | None = None  # SQL over stored figures for one that has no column of its own, computed when read

    @property
    def stored(self) -> bool:
        """Whether the figure has its own head_stats column (a derived one is computed from others when read)."""
        return self.derived is None

    def sample_sql(self) -> str:
        """Its value for one sample and head, as SQL over head_stats columns."""
        return self.name if self.derived is None else self.derived

    def head_sql(self) -> str:
        """Its reduction over a head's samples, as SQL (an aggregate, so NULLs are left out)."""
        return f"{self.reduce}({self.sample_sql()})"


# The order is that of the head_stats columns, of `add_batch`'s positional arrays and of the listings: add a new figure
# at the end.
FIGURES: tuple[Figure, ...] = (
    Figure("visual_weight", "W", "mean visual weight", listed="mean_w"),
    Figure("concentration", "C", "mean concentration", listed="mean_c"),
    Figure("region_weight", "Rw", "mean attention on the asked-about box"),
    Figure("region_share", "region", "mean share of the image attention on the asked-about box",
           listed="mean_region_share", derived="region_weight::DOUBLE / nullif(visual_weight::DOUBLE, 0)"),
    Figure("text_weight", "text", "mean attention on the prompt text"),
    Figure("sink_weight", "sink", "mean attention on the sink token (BOS)"),
    Figure("pointing", "point", "share of the samples whose most-attended image token lies on a target",
           listed="pointing"),
    Figure("spatial_entropy", "SE", "mean spatial entropy of the attention above the map's mean"),
)


def stored() -> tuple[Figure, ...]:
    """The figures with a head_stats column, in declaration order: HeadFigures' fields, `add_batch`'s arrays."""
    return tuple(f for f in FIGURES if f.stored)


def stored_names() -> tuple[str, ...]:
    """The names of the stored figures, in declaration order."""
    return tuple(f.name for f in stored())


def listed() -> tuple[Figure, ...]:
    """The figures the head ranking shows, in declaration order."""
    return tuple(f for f in FIGURES if f.listed)


def legend() -> str:
    """`label: help` of each listed figure, for the notes under a head listing."""
    return "; ".join(f"{f.label}: {f.help}" for f in listed())
