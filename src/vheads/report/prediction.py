"""The report's "What head figures predict" section: ROC curves of the stored error predictions (heads, confidence,
both), the leave-one-run-out scatter of estimated against true accuracy, and the samples the heads doubt most."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from vheads.analysis import predict
from vheads.report import figures
from vheads.report import html as h
from vheads.store import PREDICTORS, Store

COLORS = {"heads": "#C44E52", "confidence": "#4C72B0", "both": "#55A868", "baseline": "#8C8C8C"}
DOUBTED = 12
MAX_PANELS = 6


def roc_figure(curves: Sequence[tuple[str, pd.DataFrame]]) -> figures.Figure:
    """One panel per run: the ROC curve of each predictor's out-of-fold error probability, its AUROC (pairs within a
    fold) in the legend."""
    n = len(curves)
    cols = min(n, 3)
    rows = math.ceil(n / cols)
    fig, axes = figures.plt.subplots(rows, cols, figsize=(4.3 * cols, 4.0 * rows), layout="constrained",
                                     squeeze=False)
    for ax, (name, frame) in zip(axes.flat, curves, strict=False):
        ax.plot([0, 1], [0, 1], color="#bbbbbb", linewidth=1, linestyle="--")
        for predictor in PREDICTORS:
            part = frame[frame["predictor"] == predictor]
            if part.empty:
                continue
            wrong = (~part["correct"].astype(bool)).to_numpy()
            fpr, tpr = predict.roc_curve(wrong, part["p_error"].to_numpy(float))
            value = predict.auroc(wrong, part["p_error"].to_numpy(float), part["fold"].to_numpy())
            ax.plot(fpr, tpr, color=COLORS[predictor], label=f"{predictor}: AUROC {value:.3f}")
        figures._text(ax, f"{name}\n{int((~frame['correct'].astype(bool)).sum() / frame['predictor'].nunique())} "
                      f"wrong of {len(frame) // frame['predictor'].nunique()}", "right answers flagged (false "
                      "positive rate)", "wrong answers flagged (true positive rate)", width=44)
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
        legend = ax.legend(fontsize=8, loc="lower right")
        for text in legend.get_texts():
            text.set_parse_math(False)
    for ax in list(axes.flat)[n:]:
        ax.set_visible(False)
    return fig


def loro_figure(table: pd.DataFrame, targets: pd.DataFrame) -> figures.Figure:
    """Estimated against true accuracy of every training run, left out in turn, per estimator; targets (their true
    accuracy when stored, never used in the fit) as stars."""
    fig, ax = figures.plt.subplots(figsize=(5.6, 5.0), layout="constrained")
    ax.plot([0, 1], [0, 1], color="#bbbbbb", linewidth=1, linestyle="--")
    for estimator in ("heads", "baseline", "confidence"):
        part = table[table["estimator"] == estimator]
        if part.empty or part["estimate"].isna().all():
            continue
        error = np.nanmean(np.abs(part["estimate"] - part["accuracy"]))
        ax.scatter(part["accuracy"], part["estimate"], s=22, color=COLORS[estimator], alpha=0.75,
                   label=f"{estimator}: mean error {error:.3f}")
        stars = targets[(targets["estimator"] == estimator) & targets["accuracy"].notna()]
        if len(stars):
            ax.scatter(stars["accuracy"], stars["estimate"], s=120, marker="*", color=COLORS[estimator],
                       edgecolor="black", linewidth=0.6, zorder=3)
    figures._text(ax, "accuracy estimated without the run's answers (leave-one-run-out)", "true accuracy",
                  "estimated accuracy", width=50)
    ax.set_xlim(-0.02, 1.02)
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left")
    return fig


def prediction_section(store: Store, out: Path) -> h.Section | None:
    """The section, or None when the store holds neither error predictions nor accuracy estimates."""
    kept = store.predictions()
    estimates = store.accuracy_estimates()
    if kept.empty and estimates.empty:
        return None
    section = h.Section("prediction", "What head figures predict")
    if not kept.empty:
        kept = kept[kept["correct"].notna()]
        runs = list(dict.fromkeys(kept["run"]))
        shown = runs[:MAX_PANELS]
        drawn = roc_figure([(name, kept[kept["run"] == name]) for name in shown])
        path = figures.save(drawn, out / "prediction-roc.png")
        heads = ", ".join(sorted({str(v) for v in kept["heads"].dropna()}))
        section.body.append(h.figure(path, "ROC curves of the error predictions", (
            "Each sample's chance of a wrong answer, predicted by vheads predict errors from the figures of the "
            f"{heads or 'chosen'} heads, from the answer's own confidence (first-token probability and mean "
            "log-probability) and from both, each by logistic regression on the other folds (samples of one image "
            "in one fold). A curve sweeps the threshold; AUROC compares samples within a fold.")
            + (f" {len(runs) - len(shown)} more run(s) with predictions are not drawn." if len(runs) > len(shown)
               else "")))
        section.body.append("<h3>The answers the heads doubt most</h3>")
        doubted = kept[kept["predictor"] == "heads"].sort_values("p_error", ascending=False).head(DOUBTED)
        frame = doubted[["run", "sample_id", "question", "answer", "prediction", "p_error", "correct"]].copy()
        frame["correct"] = frame["correct"].map(lambda v: "yes" if bool(v) else "no")
        section.body.append(h.paragraph("The samples with the highest predicted chance of a wrong answer from the "
                                        "heads' figures alone (out of fold), and whether the answer was wrong."))
        section.body.append(h.table(frame.rename(columns={"sample_id": "sample", "answer": "true answer",
                                                          "prediction": "model's answer", "p_error": "P(wrong)"})))
    if not estimates.empty:
        left_out = estimates[estimates["role"] == "left-out"]
        targets = estimates[estimates["role"] == "target"]
        if not left_out.empty:
            path = figures.save(loro_figure(left_out, targets), out / "prediction-loro.png")
            section.body.append("<h3>A run's accuracy without its answers</h3>")
            section.body.append(h.figure(path, "leave-one-run-out accuracy estimates", (
                "vheads predict accuracy: each training run's accuracy estimated from the others by ridge "
                "regression on per-run head figures (heads), by the others' mean accuracy (baseline) and by its "
                "mean first-token probability (confidence); stars: target runs, at their stored accuracy, which "
                "the fit never read.")))
        if not targets.empty:
            wide = targets.pivot_table(index=["run", "accuracy"], columns="estimator", values="estimate",
                                       dropna=False).reset_index()
            wide = wide.rename(columns={"accuracy": "stored accuracy (not used)"})
            section.body.append(h.table(wide))
    return section
