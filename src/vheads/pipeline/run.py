"""`vheads run`: generate answers over a dataset, score them, and store every sample's head figures.

The run's options are prepared in `config`, its batches computed in `batches` and stored by `writer`.
"""

from __future__ import annotations

import logging
import signal
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vheads.data import Dataset
from vheads.data.skips import SkipLog
from vheads.models import Loaded
from vheads.pipeline.batches import Runner, compute, skip_reason
from vheads.pipeline.config import RunConfig, ablation_label, prepare_run, shard_samples
from vheads.pipeline.pruning import run_image_kv
from vheads.pipeline.writer import BatchWriter
from vheads.store import RunHandle, Store, StoreError

log = logging.getLogger("vheads.run")


class Interrupted(Exception):
    """The run was stopped by SIGINT / SIGTERM; finished batches are stored and the run can be resumed."""


@dataclass
class RunSummary:
    """What a finished (or interrupted) run reports."""

    name: str
    run_id: int
    store: str
    samples: int
    correct: int
    accuracy: float | None
    by_type: dict[str, float]
    skipped: dict[str, int]
    status: str
    seconds: float
    extra: dict[str, Any] = field(default_factory=dict)
    long_prompts: int = 0
    max_positions: int | None = None
    notes: list[str] = field(default_factory=list)


def run(config: RunConfig, loaded: Loaded | None = None, dataset: Dataset | None = None,
        progress: Callable[[int, int, int, int], None] | None = None,
        start: Callable[[int, int], None] | None = None) -> RunSummary:
    """Run a model over a dataset and store the result; safe to kill and `resume`.

    Errors that stop the run before it starts (bad data file, model, store) raise DataError / ModelError /
    StoreError. `start(done, total)` is called once the run is open and `progress(done, total, correct, scored)`
    after each computed batch: samples of the run answered (those stored before a resume included) of its
    `total`, how many of them are correct and how many have an answer to score. Batches are stored on a
    background thread (`BatchWriter`) while the next one computes, and all of them before `run` returns.
    """
    store_path = config.store_path()
    created = not store_path.exists()
    handle = None
    try:
        store = Store(store_path)  # opened first: a busy or unwritable store fails before the model loads
    except BaseException:
        _drop_if_empty(store_path, created)
        raise
    try:
        with store:
            plan = prepare_run(config, store, loaded, dataset)
            config, loaded, dataset = plan.config, plan.loaded, plan.dataset
            handle = store.start_run(
                plan.name, model=loaded.name, family=loaded.family, dataset=dataset.name, split=dataset.split or "",
                layers=plan.layers, heads=plan.heads, readout=config.readout, ablation=ablation_label(config),
                config=plan.settings, resume=config.resume, curve=config.curve, shard=config.shard,
                tags={**config.tags, **run_image_kv(config, loaded.model.config, plan.heads,
                                                    plan.attention_layers)} or None,
            )
            return _run_samples(store, handle, config, loaded, dataset, store_path, progress, start)
    except BaseException:
        if handle is None:
            _drop_if_empty(store_path, created)
        raise


def _run_samples(store: Store, handle: RunHandle, config: RunConfig, loaded: Loaded, dataset: Dataset,
                 store_path: Path, progress: Callable[[int, int, int, int], None] | None,
                 start: Callable[[int, int], None] | None) -> RunSummary:
    """Compute and store the samples of an open run that are not stored yet; finish it and summarize."""
    name = handle.name
    samples = shard_samples(dataset.samples, config.shard)
    began = time.time()
    runtime_skips: Counter[str] = Counter()
    todo = [s for s in samples if s.id not in handle.done_ids]
    done, correct, scored = answered(store, handle)
    if start:
        start(done, len(samples))
    runner = Runner(loaded, config)
    skip_log = SkipLog(log)

    def stored(rows: Sequence[dict[str, Any]]) -> None:
        log.info("stored %d samples of run %s", len(rows), name)

    try:
        with interrupt_guard(), BatchWriter(store, handle, on_stored=stored) as writer:
            for batch in compute(runner, todo, config.batch_size):
                for sample_id, reason in batch.skipped:
                    skip_log.add(skip_reason(reason), f"skipped sample {sample_id}: {reason}")
                    runtime_skips[skip_reason(reason)] += 1
                if batch.figures is None:
                    continue
                writer.submit(batch.rows, batch.figures)
                done += len(batch.rows)
                correct += sum(bool(r["correct"]) for r in batch.rows)
                scored += sum(r["correct"] is not None for r in batch.rows)
                if progress:
                    progress(done, len(samples), correct, scored)
    except KeyboardInterrupt:
        skip_log.close()
        store.finish_run(handle, status="interrupted", skipped=_skips(dataset, runtime_skips))
        raise Interrupted(f"run {name!r} interrupted; finished batches are stored. Continue it with "
                          f"--name {name} --resume") from None
    except Exception:
        store.finish_run(handle, status="failed", skipped=_skips(dataset, runtime_skips))
        raise
    skip_log.close()
    summary = summarize(store, handle, store_path, _skips(dataset, runtime_skips), dataset.metrics,
                        time.time() - began, runner.max_positions)
    if runner.no_regions:
        summary.notes.append(runner.no_regions)
    store.finish_run(handle, status="done", accuracy=summary.accuracy, skipped=summary.skipped)
    return summary


def answered(store: Store, handle: RunHandle) -> tuple[int, int, int]:
    """(samples stored, correct, scored) of a run so far: where a resumed run's progress starts."""
    row = store.query("SELECT count(*) AS n, count(*) FILTER (WHERE correct) AS correct, count(correct) AS scored "
                      "FROM samples WHERE run_id = ?", [handle.run_id]).iloc[0]
    return int(row["n"]), int(row["correct"]), int(row["scored"])


def _drop_if_empty(path: Path, created: bool) -> None:
    """Remove a store file this run created when nothing was written to it (the model or data failed to load)."""
    if not created or not path.exists():
        return
    try:
        with Store(path, read_only=True) as store:
            if len(store.runs()):
                return
    except StoreError:
        return
    for leftover in (path, path.with_name(path.name + ".wal")):
        leftover.unlink(missing_ok=True)


@contextmanager
def interrupt_guard() -> Iterator[None]:
    """Turn SIGTERM into KeyboardInterrupt for the duration, so both stop the run the same clean way."""
    def raise_interrupt(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    try:
        previous = signal.signal(signal.SIGTERM, raise_interrupt)
    except ValueError:  # not the main thread
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _skips(dataset: Dataset, runtime: Counter[str]) -> dict[str, int]:
    counts = Counter(dataset.skip_summary())
    counts.update(runtime)
    return dict(counts)


def summarize(store: Store, handle: RunHandle, store_path: Path, skipped: dict[str, int], metrics: Sequence[str],
              seconds: float, max_positions: int | None = None) -> RunSummary:
    """The run's totals, computed in the store (a resumed run counts its earlier batches too), with the dataset's
    own run `metrics` (`Dataset.metrics`, e.g. POPE's F1) in `extra`."""
    counts = store.query(
        "SELECT coalesce(question_type, 'all') AS question_type, count(*) AS n, count(correct) AS scored, "
        "count(*) FILTER (WHERE correct) AS correct FROM samples WHERE run_id = ? GROUP BY 1 ORDER BY 1",
        [handle.run_id],
    )
    n, scored, correct = (int(counts[c].sum()) for c in ("n", "scored", "correct"))
    by_type = {str(row.question_type): row.correct / row.scored for row in counts.itertuples() if row.scored}
    extra: dict[str, Any] = {}
    if scored and metrics:
        from vheads.data.scoring import run_metrics

        answered = store.query("SELECT prediction, answer FROM samples WHERE run_id = ? AND correct IS NOT NULL "
                               "ORDER BY sample_id", [handle.run_id])
        extra.update(run_metrics(metrics, list(answered["prediction"]), list(answered["answer"])))
    long_prompts = int(store.query(
        "SELECT count(*) AS n FROM samples WHERE run_id = ? AND "
        "coalesce(json_extract(meta, '$.over_max_positions')::BOOLEAN, false)", [handle.run_id])["n"].iloc[0])
    return RunSummary(name=handle.name, run_id=handle.run_id, store=str(store_path), samples=n, correct=correct,
                      accuracy=correct / scored if scored else None, by_type=by_type,
                      skipped=skipped, status="done", seconds=seconds, extra=extra,
                      long_prompts=long_prompts, max_positions=max_positions)
