"""`vheads demo`: the whole study on the embedded default in one call: run, compare prompt styles, rank, ablate,
prune (only a few heads keep the image, beside FastV), report."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import pandas as pd

from vheads.analysis.ranking import head_table
from vheads.pipeline.config import RunConfig
from vheads.pipeline.run import RunSummary
from vheads.report.build import build_report
from vheads.store import Store

STORE_NAME = "vheads-demo.duckdb"
RUN_NAME = "demo"
SELECTORS = ("top", "random", "late")
KEEP_SELECTORS = ("top", "random")
STYLES = ("plain", "none")


@dataclass
class DemoSettings:
    """What the demo runs; the defaults fit in a few minutes on a 2-core CPU with the embedded model."""

    out: Path = Path("vheads-demo")
    store: Path | None = None
    limit: int = 300
    curve_limit: int | None = None
    ks: tuple[int, ...] = (0, 4, 8)
    seeds: int = 3
    overlays: int = 3
    model: str | None = None
    batch_size: int = 16
    styles: tuple[str, ...] = STYLES
    keep_ks: tuple[int, ...] = (8, 24, 48)
    keep_seeds: int = 2
    fastv: tuple[tuple[int, float], ...] = ((2, 0.25),)

    def store_path(self) -> Path:
        """The store the demo writes: `--store`, else a fresh `vheads-demo.duckdb` inside the output folder."""
        return self.store if self.store is not None else self.out / STORE_NAME


@dataclass
class DemoResult:
    """Where everything went and how long each step took."""

    index: Path
    store: Path
    run: RunSummary
    style_runs: dict[str, str]
    ranking: pd.DataFrame
    points: list[dict[str, Any]]
    pruning: list[dict[str, Any]] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)


def fresh_store(settings: DemoSettings) -> Path:
    """The demo's store path; the default one is deleted first so every demo starts clean (a `--store` is kept)."""
    path = settings.store_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    if settings.store is None:
        for stale in (path, path.with_name(path.name + ".wal")):
            stale.unlink(missing_ok=True)
    return path


def run_demo(settings: DemoSettings, say: Callable[[str], None] = print,
             on_ranking: Callable[[pd.DataFrame], None] | None = None) -> DemoResult:
    """Run the study: held-out ShapesQA through the model, the same questions in the other prompt styles, head
    ranking, a small pruning curve, a small efficiency frontier, the report.

    The curve ablates the top visual heads, random heads (several seeds) and the weakest late heads, K at a
    time, each point a stored run, on the same questions (or `curve_limit` questions drawn with the same seed).
    The frontier keeps the image only for the top or random K heads (`keep_ks`, every other head image-blind)
    and prunes image tokens with FastV (`fastv`), on the same questions as the curve.
    """
    from vheads.analysis.ablation import curve
    from vheads.data import load_dataset
    from vheads.models import load
    from vheads.pipeline.run import run

    seconds: dict[str, float] = {}
    began = time.time()
    store = fresh_store(settings)
    loaded = load(settings.model)
    config = RunConfig(model=settings.model, limit=settings.limit, store=str(store), batch_size=settings.batch_size)
    dataset = load_dataset(config.dataset, limit=config.limit, seed=config.seed)
    existing = _names(store)
    say(f"1/6 running {loaded.name} on {len(dataset.samples)} held-out ShapesQA questions")
    summary = run(replace(config, name=_free(RUN_NAME, existing)), loaded=loaded, dataset=dataset)
    seconds["run"] = time.time() - began
    step = time.time()
    style_runs = {"visual": summary.name}
    if settings.styles:
        say(f"2/6 the same questions with the box as text coordinates or left out: {', '.join(settings.styles)}")
    accuracies = {"visual": summary.accuracy}
    for style in settings.styles:
        styled = replace(config, prompt_style=style, name=_free(f"{RUN_NAME}-{style}", existing))
        data = load_dataset(config.dataset, limit=config.limit, seed=config.seed, prompt_style=style)
        done = run(styled, loaded=loaded, dataset=data)
        style_runs[style], accuracies[style] = done.name, done.accuracy
    if settings.styles:
        say("    accuracy by prompt style: " + ", ".join(
            f"{style} {value:.3f}" for style, value in accuracies.items() if value is not None))
    seconds["styles"] = time.time() - step
    with Store(store, read_only=True) as db:
        ranking = head_table(db, summary.name)
    say(f"3/6 ranked {len(ranking)} heads; accuracy {summary.accuracy:.3f}" if summary.accuracy is not None
        else f"3/6 ranked {len(ranking)} heads")
    if on_ranking:
        on_ranking(ranking)
    step = time.time()
    curve_config, curve_data = config, dataset
    if settings.curve_limit is not None and settings.curve_limit != settings.limit:
        curve_config = replace(config, limit=settings.curve_limit)
        curve_data = load_dataset(config.dataset, limit=settings.curve_limit, seed=config.seed)
    say(f"4/6 ablating K = {', '.join(map(str, settings.ks))} heads (top, {settings.seeds} random seeds, late) "
        f"on {len(curve_data.samples)} questions")
    points = curve(store, summary.name, selectors=SELECTORS, ks=settings.ks, seeds=settings.seeds,
                   config=curve_config, loaded=loaded, dataset=curve_data)
    seconds["curve"] = time.time() - step
    step = time.time()
    pruning: list[dict[str, Any]] = []
    if settings.keep_ks or settings.fastv:
        say(f"5/6 pruning: only the top or random K = {', '.join(map(str, settings.keep_ks))} heads keep the image "
            f"(the others image-blind), and FastV " + ", ".join(f"K={k} R={r:g}" for k, r in settings.fastv))
    if settings.keep_ks:
        pruning += curve(store, summary.name, selectors=KEEP_SELECTORS, ks=settings.keep_ks,
                         seeds=settings.keep_seeds, ablation="image-blind", keep=True, config=curve_config,
                         loaded=loaded, dataset=curve_data)
    if settings.fastv:
        pruning += curve(store, summary.name, ablation="fastv", fastv=settings.fastv, config=curve_config,
                         loaded=loaded, dataset=curve_data)
    seconds["pruning"] = time.time() - step
    step = time.time()
    say("6/6 writing the report")
    index = build_report(store, settings.out, runs=[summary.name], overlays=settings.overlays,
                         styles=style_runs if settings.styles else None)
    seconds["report"] = time.time() - step
    seconds["total"] = time.time() - began
    return DemoResult(index=index, store=store, run=summary, style_runs=style_runs, ranking=ranking, points=points,
                      pruning=pruning, seconds=seconds)


def _free(name: str, existing: set[str]) -> str | None:
    """`name` if no run has it yet, else None (the pipeline then picks a fresh name)."""
    return name if name not in existing else None


def _names(store: Path) -> set[str]:
    if not store.exists():
        return set()
    with Store(store, read_only=True) as db:
        runs = db.runs()
    return set(runs["name"]) if len(runs) else set()
