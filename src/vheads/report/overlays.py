"""Attention drawn back onto the image: each image token's attention spread over its patch in original pixels.

A token's patch box comes from the family's `TokenGrid` (LLaVA-1.5: one grid; LLaVA-NeXT / OneVision: the base
grid and the anyres tiles; InternVL: tiles and a thumbnail; Idefics3 / SmolVLM: crops and the global image; the
whole-image frame and the tiles cover the same picture at different scales, so their densities add up). The picture is
attention mass per pixel relative to an even spread over the image, on a log scale: transparent where a pixel
gets no more than its even share, brightest at `FOCUS_TOP` times it or more. A head that looks everywhere leaves
the image clear; a head that looks at one patch lights it up.
"""

from __future__ import annotations

import textwrap
from collections.abc import Collection, Sequence
from dataclasses import dataclass

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.axes import Axes  # noqa: E402
from matplotlib.cm import ScalarMappable  # noqa: E402
from matplotlib.colors import LogNorm  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.patches import Rectangle  # noqa: E402

from vheads.analysis.boxes import attention_density  # noqa: E402
from vheads.heads import (
    Head,  # noqa: E402
    format_heads,
)
from vheads.pipeline.replay import SampleAttention  # noqa: E402

MAX_HEAD_PANELS = 3
PANEL_INCHES = 2.8
BOX_COLOR = "#00e5ff"
TARGET_COLOR = "white"
PREDICTED_COLOR = "#39ff14"
FOCUS_TOP = 16.0


def focus(density: np.ndarray) -> np.ndarray:
    """0..1 per pixel: log of the density over its image mean, 0 at or below the mean, 1 at `FOCUS_TOP` times it."""
    mean = density.mean()
    if mean <= 0:
        return np.zeros_like(density)
    with np.errstate(divide="ignore"):
        ratio = np.log2(np.maximum(density / mean, 1e-12)) / np.log2(FOCUS_TOP)
    return np.clip(ratio, 0.0, 1.0)


@dataclass
class DrawnBoxes:
    """Boxes to draw on a sample besides its asked-about box: the true target boxes and the box a head set drew
    (`vheads ground`), labelled with that head set's selector."""

    label: str
    predicted: Sequence[float] | None
    targets: Sequence[Sequence[float]]


def _outline(ax: Axes, box: Sequence[float], color: str, style: str, width: float) -> None:
    x1, y1, x2, y2 = box
    ax.add_patch(Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, edgecolor=color, linewidth=width, linestyle=style))


def _draw(ax: Axes, item: SampleAttention, weights: np.ndarray, title: str, box: Sequence[float] | None,
          extra: DrawnBoxes | None = None) -> None:
    """The image, the attention focus on top (transparent where even or lower), the asked-about box outlined, and
    the true and predicted boxes when given."""
    image = np.asarray(item.image.convert("RGB"))
    height, width = image.shape[:2]
    strength = focus(attention_density(item.grid, weights, width, height))
    ax.imshow(image, interpolation="bilinear")
    rgba = matplotlib.colormaps["inferno"](strength)
    rgba[..., 3] = 0.8 * strength
    ax.imshow(rgba, interpolation="nearest")
    if extra is not None:
        for target in extra.targets:
            _outline(ax, target, TARGET_COLOR, ":", 1.2)
        if extra.predicted is not None:
            _outline(ax, extra.predicted, PREDICTED_COLOR, "-", 1.6)
    if box is not None:
        _outline(ax, box, BOX_COLOR, "--", 1.6)
    ax.set_xlim(0, width)
    ax.set_ylim(height, 0)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(title, parse_math=False, fontsize=10)


def overlay_figure(item: SampleAttention, box: Sequence[float] | None, question: str, answer: str | None,
                   prediction: str | None, correct: bool | None, visual: Collection[Head] = (),
                   grounded: DrawnBoxes | None = None, box_shown: bool = True) -> Figure:
    """One sample: the heads' attention summed, then each head on its own (visual heads marked), with the text;
    `grounded` adds the true target boxes (dotted) and the box a head set drew (solid green) to every panel.
    `box_shown` False says under the figure that the dashed box was not shown to the model (prompt style none)."""
    heads = item.heads[:MAX_HEAD_PANELS]
    weights = item.visual_weight()
    combined = len(heads) > 1
    panels = len(heads) + combined
    width = max(4.4, PANEL_INCHES * panels + 0.8)
    fig, axes = plt.subplots(1, panels, figsize=(width, PANEL_INCHES + 1.0), layout="constrained", squeeze=False)
    if combined:
        label = format_heads(heads, ", ")
        _draw(axes[0][0], item, np.nansum(item.maps[: len(heads)], axis=0), f"heads {label} together", box,
              grounded)
    for i, (layer, head) in enumerate(heads):
        kind = " (visual)" if (layer, head) in visual else ""
        _draw(axes[0][i + combined], item, item.maps[i], f"head {layer}.{head}{kind}  W = {weights[i]:.2f}", box,
              grounded)
    bar = fig.colorbar(ScalarMappable(LogNorm(1, FOCUS_TOP), "inferno"), ax=axes[0][-1], shrink=0.8, pad=0.02,
                       label="× even share")
    bar.set_ticks([1, 2, 4, 8, 16], labels=["1", "2", "4", "8", "≥16"])
    verdict = {True: "correct", False: "wrong", None: "unscored"}[correct]
    text = (f"[{verdict}] {item.sample.id}  Q: {question}\nanswer: {answer if answer is not None else '-'}   "
            f"prediction: {prediction if prediction is not None else '-'}")
    if box is not None and not box_shown:
        text += "\ndashed: the true box, from the data; not shown to the model"
    if grounded is not None:
        text += f"\ngreen: the box drawn by {grounded.label}; dotted: the true target boxes"
    chars = int(width * 12)
    wrapped = "\n".join(textwrap.fill(line, chars, max_lines=3, placeholder=" …") for line in text.splitlines())
    fig.suptitle(wrapped, parse_math=False, fontsize=10, ha="left", x=0.01)
    return fig
