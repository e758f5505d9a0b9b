"""`vheads predict`: which answers to doubt (`errors`) and a run's accuracy without its answers (`accuracy`), from
stored head figures."""

from __future__ import annotations

import sys

import pandas as pd
import typer

from vheads.cli.common import FORMAT_HELP, STORE_HELP, errors, existing_store
from vheads.cli.output import check_format, console, emit_many, frame_table, json_text, records, say

predict_app = typer.Typer(help="Predict from head figures: which answers are likely wrong, and a run's accuracy "
                          "without its answers. On a shared machine, OPENBLAS_NUM_THREADS=1 keeps the fits fast.",
                          no_args_is_help=True)

ERRORS_LEGEND = ("AUROC of the cross-validated error probability (1 = every wrong answer above every right one, 0.5 "
                 "= chance); low, high: 95% cluster-bootstrap interval over images; heads: figures of the chosen "
                 "heads; confidence: first-token probability and mean log-probability; labels shuffled: the heads "
                 "refitted on shuffled labels, which should give about 0.5")
ACCURACY_LEGEND = ("estimate: the target's accuracy; LORO error: mean absolute error over the training runs, each left "
                   "out and estimated from the others; heads: ridge on head figures; baseline: mean accuracy of the "
                   "training runs; confidence: mean first-token probability; accuracies shuffled: the heads refitted "
                   "on shuffled accuracies, which should be no better than the baseline")


def _names(text: str, option: str) -> list[str]:
    names = [part.strip() for part in text.split(",") if part.strip()]
    if not names:
        raise ValueError(f"{option} is empty; name runs, comma-separated")
    return names


@predict_app.command("errors")
def predict_errors(
    runs: str = typer.Option(..., "--runs", help="Runs, comma-separated (names or ids); each is fitted on its own "
                             "unless --pool."),
    head_set: str = typer.Option("visual", "--heads", help="visual (the visual heads, chosen on each training fold) "
                                 "or all (every head)."),
    pooled: bool = typer.Option(False, "--pool", help="Fit the runs together (one grid; one image in several runs is "
                                "one group)."),
    folds: int = typer.Option(5, "--folds", min=2, help="Cross-validation folds, grouped by image."),
    boot: int = typer.Option(1000, "--boot", min=10, help="Bootstrap draws for the AUROC intervals."),
    seed: int = typer.Option(0, "--seed", help="Seed of the folds, the bootstrap and the label shuffle."),
    shuffle_check: bool = typer.Option(True, "--shuffle-check/--no-shuffle-check", help="Also fit the heads on "
                                       "shuffled labels (should give AUROC about 0.5)."),
    store: str = typer.Option("vheads.duckdb", "--store", help=STORE_HELP),
    fmt: str = typer.Option("table", "--format", help=FORMAT_HELP + " CSV and JSON: the AUROC table and the "
                            "differences."),
) -> None:
    """Predict which answers are wrong from the head figures (W, C, region share, pointing) of each sample, by
    logistic regression cross-validated with samples of one image kept in one fold; compare with the answer's own
    confidence and with both together.

    Runs need at least 20 right and 20 wrong answers. Each sample's out-of-fold error probability is kept in the
    store's `predictions` table (run_id, predictor, sample_id, p_error, fold), for `vheads query` and the report.
    """
    from vheads.analysis.errors import HEAD_SETS, predict_runs
    from vheads.store import Store

    with errors():
        check_format(fmt)
        if head_set not in HEAD_SETS:
            raise ValueError(f"unknown --heads {head_set!r}; expected one of {', '.join(HEAD_SETS)}")
        with Store(existing_store(store)) as db:
            results = predict_runs(db, _names(runs, "--runs"), head_set=head_set, pooled=pooled, k=folds,
                                   n_boot=boot, seed=seed, shuffle_check=shuffle_check)
    table = pd.concat([result.table() for result in results], ignore_index=True)
    differences = pd.DataFrame([{"runs": r.label, "difference": "heads - confidence", "value": r.difference[0],
                                 "low": r.difference[1], "high": r.difference[2]}
                                for r in results if r.difference is not None])
    if fmt != "table":
        emit_many({"auroc": table, "differences": differences}, fmt)
        return
    for result in results:
        used = sorted(set(result.heads_used))
        heads = (f"{used[0]}" if len(used) == 1 else f"{used[0]}-{used[-1]}") + f" {result.head_set} heads per fold"
        title = f"errors of {result.label}: {len(result.data.wrong)} samples, {int(result.data.wrong.sum())} wrong; " \
                f"{heads}"
        shown = result.table().drop(columns=["runs", "samples", "wrong"])
        console.print(frame_table(shown, title=title, legend=ERRORS_LEGEND))
        if result.difference is not None:
            value, low, high = result.difference
            say(f"heads - confidence: {value:+.3f} [{low:+.3f}, {high:+.3f}]")
        for note in result.notes:
            say(f"note: {note}")
    say(f"error probabilities kept in the predictions table of {store}")


@predict_app.command("accuracy")
def predict_accuracy(
    target: str = typer.Option(..., "--target", help="The run whose accuracy is estimated (its answers are not "
                               "read)."),
    train: str = typer.Option(None, "--train", help="Labelled runs of the same model to fit on, comma-separated "
                              "(default: every other finished, scored run of the target's model and grid)."),
    features: str = typer.Option("heads", "--features", help="heads (mean W and C of every head) or stages (of "
                                 "early, mid, late)."),
    seed: int = typer.Option(0, "--seed", help="Seed of the accuracy shuffle."),
    store: str = typer.Option("vheads.duckdb", "--store", help=STORE_HELP),
    fmt: str = typer.Option("table", "--format", help=FORMAT_HELP + " CSV and JSON: the estimates and the "
                            "leave-one-run-out table."),
) -> None:
    """Estimate a run's accuracy from its head figures alone: a ridge regression from per-run means of W and C to
    accuracy, fitted on other labelled runs of the same model (the same layers x heads), judged by leave-one-run-out
    against the mean accuracy of the other runs and the mean first-token probability.

    The estimates are kept in the store's `accuracy_estimates` table (role target, or left-out for the
    leave-one-run-out estimates of the training runs).
    """
    from vheads.analysis.accuracy import estimate_accuracy
    from vheads.store import Store

    with errors():
        check_format(fmt)
        with Store(existing_store(store)) as db:
            result = estimate_accuracy(db, target, _names(train, "--train") if train is not None else None,
                                       features=features, seed=seed)
    if fmt == "json":
        sys.stdout.write(json_text({"target": result.target, "stored_accuracy": result.stored_accuracy,
                                    "estimates": records(result.summary()), "loro": records(result.loro),
                                    "train": result.train, "features": result.features}) + "\n")
        return
    if fmt == "csv":
        emit_many({"estimates": result.summary(), "loro": result.loro}, "csv")
        return
    title = (f"accuracy of {result.target} from {result.features} figures, fitted on {len(result.train)} runs "
             f"(leave-one-run-out over them)")
    console.print(frame_table(result.summary(), title=title, legend=ACCURACY_LEGEND,
                              headers={"loro_mae": "LORO error"}))
    if result.stored_accuracy is not None:
        say(f"stored accuracy of {result.target} (not used): {result.stored_accuracy:.3f}")
    for note in result.notes:
        say(f"note: {note}")
    say(f"estimates kept in the accuracy_estimates table of {store}")


def register(app: typer.Typer) -> None:
    """Add the `predict` group to the vheads app."""
    app.add_typer(predict_app, name="predict")
