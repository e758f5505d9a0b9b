"""The analysis commands: `ablate` (pruning curves), `compare` (figures across runs) and `ground` (boxes from the
attention of chosen heads)."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any

import pandas as pd
import typer

from vheads.cli.common import (
    FORMAT_HELP,
    STORE_HELP,
    at_least,
    check_choice,
    errors,
    existing_store,
    explicit_options,
    parse_stages_option,
    setup_logging,
)
from vheads.cli.output import ProgressView, check_format, console, emit, emit_many, frame_table, records, say

JSON_POINT_KEYS = ("selector", "k", "seed", "accuracy", "low", "high", "heads", "mode", "kept", "image_kv_share",
                   "fastv_layer", "fastv_keep")
GROUND_HEADERS = {"selector": "heads", "n": "n", "unseen": "unseen", "pointing": "pointing", "iou": "IoU",
                  "acc50": "acc50"}
CONSISTENCY_HEADERS = {"mean_w_pearson": "W r", "mean_w_spearman": "W rho", "score_pearson": "score r",
                       "score_spearman": "score rho", "top_k_overlap": "overlap"}


def ablate(
    ctx: typer.Context,
    from_run: str = typer.Option(..., "--from", help="Run whose head ranking picks the top / late heads, and whose "
                                 "stored options (model, data, limit, seed, readout, ...) the points reuse."),
    select: str = typer.Option("top,random,late", "--select", help="Selectors, comma-separated: top (top-K visual "
                               "heads), random (K random heads, several seeds), late (K lowest-scoring late heads), "
                               "pointing, region, cost (the K heads costliest to ablate alone, from --each)."),
    ks: str = typer.Option("0,4,8,16", "--k", help="Numbers of heads to ablate, comma-separated (0 = baseline)."),
    seeds: int = typer.Option(5, "--seeds", min=1, help="Random head sets per K (seeds 0..N-1)."),
    ablation: str = typer.Option("zero", "--mode", "--ablation", help="zero (output zeroed), uniform (uniform "
                                 "weights), image-blind (image keys leave the head's softmax), flow-blind (only "
                                 "text rows lose them) or fastv (after --fastv-layer only the --fastv-keep share "
                                 "of image tokens stays)."),
    keep: list[str] = typer.Option(None, "--keep", help="Keep-only (with --mode image-blind or flow-blind): only "
                                   "the heads chosen keep the image, every other head is blind; K counts the kept "
                                   "heads, and K = 0 (all blind) and K = all heads (the plain run) are added. "
                                   "Selectors, comma-separated: top, random, late, pointing, region, cost; or a "
                                   "fixed set: stage:NAME or L.H,.... Repeat for several."),
    each: bool = typer.Option(False, "--each", help="Ablation cost: one point per head, that head alone ablated in "
                              "--mode (zero, uniform, image-blind or flow-blind), and one unablated point; prints "
                              "the heads costliest to lose. The `cost` selector then ranks heads by it."),
    each_of: str = typer.Option(None, "--each-of", help="With --each (implied): only these heads, as a selector "
                                "(top:64, stage:late, pointing:32, ...) or an L.H list; a later --each reuses "
                                "their points. Default: every head."),
    fastv_layer: str = typer.Option(None, "--fastv-layer", help="FastV's K, comma-separated: layers before it see "
                                    "every image token (with --mode fastv)."),
    fastv_keep: str = typer.Option(None, "--fastv-keep", help="FastV's R, comma-separated, each in (0, 1]: the share "
                                   "of image tokens kept after --fastv-layer (one point per K and R)."),
    model: str = typer.Option(None, "--model", "-m", help="Hub id or local folder of the model (default: "
                                                                 "the model of --from)."),
    dataset: str = typer.Option("shapes", "--dataset", "-d", help="Dataset loader (see `vheads data list`); "
                                "this and every option below default to the stored options of --from."),
    data: str = typer.Option(None, "--data", help="The benchmark file or folder (not needed for shapes)."),
    images: str = typer.Option(None, "--images", help="Folder that image paths are relative to."),
    split: str = typer.Option(None, "--split", help="Split (shapes: test/train)."),
    question_type: str = typer.Option(None, "--question-type", help="general, obj or super."),
    prompt_style: str = typer.Option(None, "--prompt-style", help="visual, plain or none."),
    limit: int = typer.Option(None, "--limit", "-n", help="At most this many questions."),
    batch_size: int = typer.Option(8, "--batch-size", "-b", min=1, help="Samples per batch (halved on OOM)."),
    max_new_tokens: int = typer.Option(8, "--max-new-tokens", min=1, help="Answer length limit (greedy)."),
    readout: str = typer.Option("prompt", "--readout", help="prompt, first-generated or generated."),
    seed: int = typer.Option(0, "--seed", help="Seed for --limit sampling."),
    device: str = typer.Option("auto", "--device", help="Where the model runs: auto, cpu, cuda, cuda:N (default: "
                               "that of --from)."),
    stages: str = typer.Option(None, "--stages", help="A,B: stage boundaries for late (default: those of --from)."),
    store: str = typer.Option("vheads.duckdb", "--store", help=STORE_HELP),
    fmt: str = typer.Option("table", "--format", help="table, csv or json (csv and json: one row per point, "
                            "{selector, k, seed, accuracy, low, high, heads, mode, kept, image_kv_share, "
                            "fastv_layer, fastv_keep})."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="More log lines."),
) -> None:
    """Pruning curve: accuracy as the top visual heads, random heads or weak late heads are ablated, K at a time;
    with --keep, as only K heads keep seeing the image; with --mode fastv, as FastV prunes image tokens; with
    --each, what each head costs when ablated alone.

    The points run on the data and options of --from unless given here. Every point is a stored run; running the
    same curve again reuses finished points. image_kv_share: the share of the image's keys and values a point's
    cache needs (image-blind / flow-blind heads drop them, FastV keeps R of them after layer K).
    """
    setup_logging(verbose)
    from vheads.analysis.ablation import curve
    from vheads.analysis.pruning import check_pruning
    from vheads.models import check_device
    from vheads.pipeline.config import RunConfig

    with errors():
        check_format(fmt)
        at_least(limit, "--limit", 1)
        at_least(seed, "--seed", 0)
        config = RunConfig(model=model, dataset=dataset, data=data, images=images, split=split,
                           question_type=question_type, prompt_style=prompt_style, limit=limit,
                           batch_size=batch_size, max_new_tokens=max_new_tokens,
                           readout=check_choice(readout, "readout"), seed=seed, stages=parse_stages_option(stages),
                           device=device, explicit=explicit_options(ctx))
        check_device(device)
        mode = check_mode(ablation)
        selectors, sets = keep_items(keep) if keep else (_items(select, "--select", str), [])
        fastv = fastv_points(fastv_layer, fastv_keep)
        check_pruning(mode, bool(keep), fastv)
        each = each or bool(each_of)
        with ProgressView() as view:
            points = curve(existing_store(store), from_run, selectors=selectors, ks=_items(ks, "--k", int),
                           seeds=seeds, ablation=mode, config=config, keep=bool(keep), sets=sets, fastv=fastv,
                           each=each, each_of=each_of, progress=lambda label, done, total, correct, scored: view.update(
                               label, done, total, f"acc {correct / scored:.3f}" if scored else ""))
        if each:
            _print_costs(existing_store(store), from_run, mode, fmt, points[0]["curve"])
            return
    if fmt == "json":
        rows = [{key: _plain(point[key]) for key in JSON_POINT_KEYS} for point in points]
        sys.stdout.write(json.dumps(rows, indent=2) + "\n")
    elif fmt == "csv":
        frame = pd.DataFrame([{key: point[key] for key in JSON_POINT_KEYS} for point in points],
                             columns=list(JSON_POINT_KEYS))
        for column in ("heads", "kept"):
            frame[column] = frame[column].map(lambda heads: " ".join(heads) if heads else None)
        emit(frame, "csv")
    else:
        what = f"keep-only {mode}" if keep else "FastV" if mode == "fastv" else f"{mode} ablation"
        console.print(frame_table(curve_table(points), title=f"pruning curve ({what}, heads of {from_run})"))
        if keep and points:
            from vheads.analysis.pruning import keep_summary

            console.print(frame_table(keep_summary(pd.DataFrame(points)).drop(columns=["curve", "mode"]),
                                      title="how few heads need the image", legend="full: accuracy of the plain "
                                      "run; k_90: least K reaching 90% of it; k_full: least K whose 95% interval "
                                      "reaches it; share: image KV kept there; gap_random: mean (max) lead over "
                                      "random heads at the same K"))
        if points:
            say(f"points stored as runs of curve {points[0]['curve']} in {store}")


def _print_costs(store: str, from_run: str, mode: str, fmt: str, curve: str, shown: int = 20) -> None:
    """The heads' ablation costs of an each-head curve, costliest first (the table: the first `shown`)."""
    from vheads.analysis.costs import cost_table, head_costs
    from vheads.analysis.ranking import head_table
    from vheads.store import Store

    with Store(store, read_only=True) as db:
        costs = head_costs(db, from_run, mode, curve=curve)
        table = cost_table(costs, head_table(db, from_run))
    if fmt != "table":
        emit(table, fmt)
        return
    legend = (f"accuracy: with the head ablated (unablated {costs.attrs['accuracy']:.3f} on {costs.attrs['n']} "
              f"questions of {costs.attrs['data']}); cost: accuracy lost; confidence cost: mean probability of the "
              "right first answer token lost; score / pointing rank: the head's rank by the paper's score and by "
              "pointing")
    console.print(frame_table(table.head(shown), title=f"heads costliest to {mode} alone (of {len(table)}, run "
                              f"{from_run})", legend=legend))
    say(f"points stored as runs of curve {costs.attrs['curve']} in {store}; rank by it with the cost selector")


def compare(
    runs: list[str] = typer.Argument(..., help="Two or more run names or ids."),
    store: str = typer.Option("vheads.duckdb", "--store", help=STORE_HELP),
    k: int = typer.Option(None, "--k", min=1, help="Top-K heads for the overlap and the accuracy correlation "
                          "(default: round(0.1 x heads) of each run)."),
    fmt: str = typer.Option("table", "--format", help=FORMAT_HELP + " JSON: one object of tables; CSV: the tables "
                            "one after another, each under a '# name' line."),
) -> None:
    """Compare runs: head-map correlations, consistency of a model across datasets, accuracy against attention.

    The figures are also appended to the store's `comparisons` table.
    """
    from vheads.analysis.compare import compare_runs, save_comparison
    from vheads.store import Store

    with errors(), Store(existing_store(store)) as db:
        check_format(fmt)
        result = compare_runs(db, list(runs), k=k)
        saved = save_comparison(db, result)
    if fmt != "table":
        tables = {"pairs": result.pairs, "consistency": result.consistency, "per_run": result.per_run,
                  "accuracy": result.accuracy}
        if fmt == "json":
            sys.stdout.write(json.dumps({**{k: records(v) for k, v in tables.items()}, "warnings": result.warnings},
                                        indent=2, default=str) + "\n")
        else:
            emit_many(tables, "csv")
        return
    console.print(frame_table(result.pairs, title="head-map correlation (heads: same grid; depth: per-layer "
                              "profiles on relative depth)"))
    if len(result.consistency):
        console.print(frame_table(_short_models(result.consistency), title="one model across datasets",
                                  headers=CONSISTENCY_HEADERS, legend="W: mean visual weight; r: Pearson; rho: "
                                  "Spearman; overlap: shared share of the top-K heads"))
    console.print(frame_table(_short_models(result.per_run), title="accuracy and the attention of the top-K heads"))
    if len(result.accuracy):
        console.print(frame_table(result.accuracy, title="Spearman: accuracy against top-K attention"))
    for warning in result.warnings:
        say(f"warning: {warning}")
    say(f"kept {saved} figures in the comparisons table of {store}")


def ground(
    from_run: str = typer.Option(..., "--from", help="Run whose samples are grounded (run again with its stored "
                                 "model, data options and ablation)."),
    heads: list[str] = typer.Option(["localization:4"], "--heads", help="Head set: localization:K (Kang et al.'s "
                                    "localization heads), pointing:K, top:K, random:K[:seed], late:K, stage:NAME or "
                                    "L.H,...; repeat for several sets (one pass over the samples)."),
    heads_from: str = typer.Option(None, "--heads-from", help="Run of the same model whose figures the selectors "
                                   "rank (default: --from), to choose heads on other samples than those grounded."),
    allow_other_model: bool = typer.Option(False, "--allow-other-model", help="Accept a --heads-from run of "
                                           "another model with the same layers x heads."),
    sigma: float = typer.Option(0.5, "--sigma", help="Gaussian smoothing of the combined map before "
                                "thresholding, in token cells, from 0 (none) to 32."),
    store: str = typer.Option("vheads.duckdb", "--store", help=STORE_HELP),
    device: str = typer.Option("auto", "--device", help="Where the model runs: auto, cpu, cuda, cuda:N."),
    fmt: str = typer.Option("table", "--format", help="table, csv or json (json: a list of {selector, source, "
                            "heads, n, unseen, pointing, iou, acc50} objects, one per --heads)."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="More log lines."),
) -> None:
    """Ground a run's samples: boxes from the combined attention of chosen heads, scored against the true boxes.

    Per head set: n (samples scored: with a target box the model saw), unseen (samples whose target boxes all lie
    outside what the model saw, e.g. cut by a centre crop: left out of the means), pointing (share whose combined
    map peaks on a target), iou (mean IoU of the predicted box with the best-matching target) and acc50 (share
    with IoU >= 0.5). The boxes are kept in the store's groundings table; `vheads report` draws them on its
    overlays.
    """
    setup_logging(verbose)
    from vheads.analysis.boxes import check_sigma
    from vheads.analysis.grounding import ground as ground_run
    from vheads.models import GeometryError, check_device

    with errors():
        check_format(fmt)
        check_device(device)
        check_sigma(sigma)
        try:
            with ProgressView() as view:
                view.status(f"grounding the samples of {from_run} ...")
                results = ground_run(existing_store(store), from_run, heads, heads_from=heads_from, device=device,
                                     sigma_cells=sigma, allow_other_model=allow_other_model,
                                     progress=lambda done, total: view.update("ground", done, total, ""))
        except GeometryError as exc:
            raise ValueError(f"cannot ground run {from_run}: {exc}") from None
    rows = [result.summary() for result in results]
    if fmt == "json":
        sys.stdout.write(json.dumps(rows, indent=2) + "\n")
        return
    frame = pd.DataFrame(rows, columns=["selector", "source", "heads", "n", "unseen", "pointing", "iou", "acc50"])
    frame["heads"] = frame["heads"].map(" ".join)
    if fmt == "csv":
        emit(frame, "csv")
        return
    frame["selector"] = [f"{result.label()}: {heads}" for result, heads in zip(results, frame["heads"], strict=True)]
    console.print(frame_table(frame.drop(columns=["heads", "source"]), title=f"grounding the samples of {from_run}",
                              headers=GROUND_HEADERS, legend="n: samples scored (a target box the model saw); "
                              "unseen: samples whose targets lie outside what the model saw (left out); pointing: "
                              "share whose combined map peaks on a target; IoU: mean IoU of the predicted box with "
                              "the best-matching target; acc50: share with IoU >= 0.5"))
    say(f"boxes kept in the groundings table of {store}")


def curve_table(points: list[dict[str, Any]]) -> pd.DataFrame:
    """The pruning curve for the terminal: one row per selector and K (random: mean over seeds, each seed beside);
    the image KV kept for pruning curves, and the kept heads for keep-only ones."""
    rows = []
    for point in points:
        if point["selector"] == "random" and point["seed"] is not None:
            continue
        per_seed = [p for p in points if p["selector"] == "random" and p["k"] == point["k"] and p["seed"] is not None]
        stages = point["stages"] or {}
        selector = point["selector"]
        if point.get("fastv_layer") is not None:
            selector = f"fastv K={point['fastv_layer']} R={point['fastv_keep']:g}"
        share = point.get("image_kv_share")
        rows.append({"selector": selector, "k": point["k"], "accuracy": point["accuracy"],
                     "95% CI": _interval(point["low"], point["high"]), "n": point["n"],
                     **({} if share is None or _isnan(share) else {"image KV": f"{share:.2f}"}),
                     "stages e/m/l": "/".join(str(stages.get(s, "-")) for s in ("early", "mid", "late")),
                     "heads": _heads(point, per_seed)})
    frame = pd.DataFrame(rows)
    if "image KV" in frame:
        frame = frame[[c for c in ("selector", "k", "accuracy", "95% CI", "n", "image KV", "stages e/m/l", "heads")]]
        frame["image KV"] = frame["image KV"].fillna("-")
    return frame


def check_mode(mode: str) -> str:
    """`--mode` when it is a known ablation mode or fastv; ValueError listing the choices otherwise."""
    from vheads.capture import ABLATION_MODES

    allowed = (*ABLATION_MODES, "fastv")
    if mode not in allowed:
        raise ValueError(f"unknown --mode {mode!r}; expected one of {', '.join(allowed)}")
    return mode


def keep_items(values: list[str]) -> tuple[list[str], list[str]]:
    """`--keep` values as (selectors, fixed head sets): `top,random` names selectors, `stage:late` and `3.1,4.7`
    are sets of their own."""
    selectors: list[str] = []
    sets: list[str] = []
    for value in values:
        if ":" in value or "." in value:
            sets.append(value.strip())
        else:
            selectors += _items(value, "--keep", str)
    if not selectors and not sets:
        raise ValueError("--keep is empty")
    return selectors, sets


def fastv_points(layers: str | None, shares: str | None) -> list[tuple[int, float]]:
    """FastV's (K, R) points: every --fastv-layer with every --fastv-keep."""
    if layers is None and shares is None:
        return []
    if layers is None or shares is None:
        raise ValueError("--fastv-layer and --fastv-keep go together: FastV needs the layer K and the share R")
    return [(k, r) for k in _items(layers, "--fastv-layer", int) for r in _items(shares, "--fastv-keep", float)]


def register(app: typer.Typer) -> None:
    """Add `ablate`, `compare` and `ground` to the vheads app."""
    app.command()(ablate)
    app.command()(compare)
    app.command()(ground)


def _items(text: str, option: str, kind: type) -> list[Any]:
    try:
        values = [kind(v.strip()) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"{option} {text!r}: expected a comma-separated list") from None
    if not values:
        raise ValueError(f"{option} is empty")
    return values


def _short_models(frame: pd.DataFrame) -> pd.DataFrame:
    """Model folders shown by their last part, as `vheads runs` does."""
    return frame.assign(model=frame["model"].map(lambda m: Path(str(m)).name))


def _plain(value: Any) -> Any:
    if isinstance(value, float) and math.isnan(value):
        return None
    return value


def _interval(low: float, high: float) -> str:
    if math.isnan(low) or math.isnan(high):
        return "-"
    return f"[{low:.3f}, {high:.3f}]"


def _isnan(value: Any) -> bool:
    return isinstance(value, float) and math.isnan(value)


def _heads(point: dict[str, Any], per_seed: list[dict[str, Any]]) -> str:
    if point["selector"] == "random" and point["seed"] is None and per_seed:
        return f"{len(per_seed)} seeds: " + " ".join(f"{p['accuracy']:.3f}" for p in per_seed)
    heads = (point.get("kept") if point.get("kept") is not None else point["heads"]) or []
    if point.get("kept") is not None:
        return "kept: " + (", ".join(heads[:8]) + (f" (+{len(heads) - 8})" if len(heads) > 8 else "") if heads
                           else "none")
    return ", ".join(heads[:8]) + (f" (+{len(heads) - 8})" if len(heads) > 8 else "") if heads else "-"
