"""`vheads sweep`: many runs (models x datasets x options), each cut into shards, computed by workers and stored
by the driver.

The driver is the store's one writer: workers (Ray actors, or one worker in this process) load a model once,
compute batches of a run's samples and send the per-sample results back; the driver writes them through the
same `BatchWriter`, transactions and resume rules as `vheads run`. No filesystem is shared for outputs; the
models and data files must be reachable from every worker, so their paths are made absolute before they
leave the driver.
"""

from __future__ import annotations

import logging
import os
import re
import time
from collections import Counter, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import pandas as pd

from vheads.pipeline.batches import Computed, skip_reason
from vheads.pipeline.config import RunConfig, check_same_run, is_model_folder, resolve
from vheads.pipeline.run import Interrupted, RunSummary, summarize
from vheads.pipeline.writer import BatchWriter
from vheads.store import RunHandle, Store, StoreError
from vheads.sweep.study import parse_dataset
from vheads.sweep.workers import Failure, LocalPool, Opened, RayPool, first_line

log = logging.getLogger("vheads.sweep")

DEMO = "demo"
COLUMNS = ("run", "model", "dataset", "shard", "status", "samples", "accuracy", "seconds", "error")
IN_FLIGHT = 2


class SweepError(Exception):
    """A sweep cannot start (Ray missing or unreachable); one line the user can act on."""


@dataclass
class Event:
    """What the driver tells the live view: kind is 'worker', 'open', 'progress', 'failure' or 'finished'."""

    kind: str
    run: str = ""
    shard: str = ""
    done: int = 0
    total: int = 0
    new: int = 0
    text: str = ""


@dataclass
class SweepResult:
    """A sweep's shards (one row each, see `COLUMNS`) and where its time went (seconds)."""

    tasks: pd.DataFrame
    timing: dict[str, float] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        """Every shard of every run finished and is stored."""
        return bool((self.tasks["status"] == "done").all())


def model_label(model: str | None) -> str:
    """The short model name used in run names: the folder or hub repo name, `demo` for the embedded model."""
    if model in (None, "", DEMO):
        return DEMO
    return Path(str(model).rstrip("/\\")).name or str(model)


def run_name(config: RunConfig) -> str:
    """`<model>-<dataset>[-<split>][-<question type>][-<prompt style>][-<readout>][-<ablation>]`."""
    name = replace(config, ablate=[]).base_name(model_label(config.model), config.split)
    parts = [name] + [v for v in (config.question_type, config.prompt_style) if v]
    spec = (config.tags or {}).get("ablate")
    if spec:
        parts.append(f"{config.ablation}-" + re.sub(r"[^\w.+-]", "_", str(spec).replace(",", "+")))
    elif config.ablate:
        parts.append(f"{config.ablation}{len(config.ablate)}")
    return "-".join(parts)


def absolute(config: RunConfig, base: str | Path | None = None) -> RunConfig:
    """`config` with its model folder, data and images paths made absolute against `base` (default: this folder).

    A model is taken as a folder when it exists there or starts with '.', '/' or '~'; otherwise it is a hub id.
    """
    model = resolve(config.model, base) if is_model_folder(config.model, base) else config.model
    return replace(config, model=model, data=config.data and resolve(config.data, base),
                   images=config.images and resolve(config.images, base))


def plan(configs: Sequence[RunConfig], base: str | Path | None = None) -> list[RunConfig]:
    """The runs of a sweep: each config with absolute paths, its preset applied and its values checked as `vheads run`
    does (`RunConfig.with_preset`, `RunConfig.check`), named by `run_name`, resumable.

    Raises ValueError naming an option out of range, or when two configs would share a run name.
    """
    if not configs:
        raise ValueError("a sweep needs at least one model and one dataset")
    runs: list[RunConfig] = []
    seen: dict[str, RunConfig] = {}
    for config in configs:
        config = absolute(config, base).with_preset()
        config.check()
        name = config.name or run_name(config)
        if name in seen:
            raise ValueError(f"two runs of the sweep would both be run {name!r}; give the models distinct folder "
                             "names and each dataset and option once")
        seen[name] = config
        runs.append(replace(config, name=name, shard=None, resume=True))
    return runs


@dataclass
class _Run:
    """The driver's state of one run: its store handle, the samples stored or skipped, its shards."""

    config: RunConfig
    shards: list[_Shard] = field(default_factory=list)
    handle: RunHandle | None = None
    stored: set[str] = field(default_factory=set)
    skipped_ids: set[str] = field(default_factory=set)
    skipped: Counter[str] = field(default_factory=Counter)
    dataset_skips: dict[str, int] = field(default_factory=dict)
    ids: set[str] = field(default_factory=set)
    total: int | None = None
    metrics: tuple[str, ...] = ()
    began: float = field(default_factory=time.time)
    new: int = 0
    summary: RunSummary | None = None

    @property
    def name(self) -> str:
        return str(self.config.name)


@dataclass
class _Shard:
    """One shard of a run, computed by one worker at a time."""

    run: _Run
    k_of_n: tuple[int, int] | None  # the k-th of n shards; None: the whole run
    status: str = "pending"
    attempts: int = 0
    slot: int | None = None
    batches: list[list[str]] = field(default_factory=list)
    in_flight: set[Any] = field(default_factory=set)
    samples: int = 0
    seconds: float = 0.0
    began: float = 0.0
    error: str = ""
    opened: bool = False
    ids: list[str] = field(default_factory=list)
    accuracy: float | None = None

    @property
    def key(self) -> tuple[str, str]:
        return (self.run.name, self.shard)

    @property
    def shard(self) -> str:
        return "{}/{}".format(*(self.k_of_n or (1, 1)))


def run_sweep(runs: Sequence[RunConfig], store: str | Path, shards: int = 1, address: str | None = None,
              gpus_per_task: float | None = None, cpus_per_task: float = 1, num_cpus: int | None = None,
              local: bool = False, retries: int = 1, on_event: Callable[[Event], None] | None = None
              ) -> SweepResult:
    """Compute every run of `plan(...)`, cut into `shards` shards, on workers, and store it all in `store`.

    `local`: one worker in this process; else Ray: the cluster at `address` ("auto", "ray://host:10001") or a
    local Ray on `num_cpus` CPUs. `gpus_per_task` None: one GPU per worker when the cluster has GPUs when the
    worker starts, else none. A shard that fails is tried again `retries` times (bad input is not retried);
    a shard whose results do not all arrive is failed, never done. Runs already done with the same settings are
    kept without loading their model; a stored run whose defining settings differ from the planned ones is never
    added to: its shards fail, naming the differences.
    """
    if shards < 1:
        raise ValueError(f"--shards must be at least 1, got {shards}")
    began = time.perf_counter()
    emit = on_event or _log_event
    kept, refused = _stored(runs, Path(store))
    states = [_Run(config) for config in runs if config.name not in kept]
    for state in states:
        state.shards = [_Shard(state, (k, shards) if shards > 1 else None) for k in range(1, shards + 1)]
        for shard in state.shards if state.name in refused else ():
            shard.status, shard.error = "failed", refused[state.name]
            emit(Event("failure", state.name, shard.shard, text=shard.error))
    todo = [state for state in states if state.name not in refused]
    timing = {"start": 0.0, "load": 0.0}
    if todo:
        pool, stop = _pool(local, address, gpus_per_task, cpus_per_task, num_cpus, timing)
        try:
            Path(store).parent.mkdir(parents=True, exist_ok=True)
            with Store(store) as db, BatchWriter(db, None) as writer:
                _Driver(pool, writer, retries, emit, timing).run(todo)
        except KeyboardInterrupt:
            raise Interrupted("sweep interrupted; finished batches are stored. Run the same command again to "
                              "continue it") from None
        finally:
            pool.shutdown()
            stop()
    timing["wall"] = time.perf_counter() - began
    rows = [_kept_row(config, kept[config.name]) for config in runs if config.name in kept]
    rows += [_row(shard) for state in states for shard in state.shards]
    order = {config.name: i for i, config in enumerate(runs)}
    rows.sort(key=lambda row: order[row["run"]])
    return SweepResult(pd.DataFrame(rows, columns=list(COLUMNS)), timing)


class _Driver:
    """Hands shards to free workers, sends them batches, and writes what comes back; the store's one writer."""

    def __init__(self, pool: Any, writer: BatchWriter, retries: int, emit: Callable[[Event], None],
                 timing: dict[str, float]) -> None:
        self.pool, self.writer, self.retries, self.emit, self.timing = pool, writer, retries, emit, timing
        self.pending: deque[_Shard] = deque()
        self.free: list[int] = []
        self.models: dict[int, Any] = {}
        self.calls: dict[Any, tuple[_Shard, int, str, list[str]]] = {}
        self.workers = 0

    def run(self, runs: Sequence[_Run]) -> None:
        """Compute and store every shard of `runs`; returns when each is done or failed."""
        self.pending.extend(shard for state in runs for shard in state.shards)
        unsettled = len(self.pending)
        while self.pending or self.calls:
            while self.pending and not self.free and self.workers < min(self.pool.capacity(), unsettled):
                slot, what = self.pool.start()
                self.workers += 1
                self.free.append(slot)
                self.emit(Event("worker", text=f"worker {slot + 1}: {what}"))
            while self.pending and self.free:
                self._assign(self.pending.popleft())
            for handle, outcome in self.pool.wait(list(self.calls), timeout=1.0):
                shard, attempt, kind, ids = self.calls.pop(handle)
                shard.in_flight.discard(handle)
                if attempt != shard.attempts or shard.status != "running":
                    continue
                if isinstance(outcome, Failure):
                    self._fail(shard, outcome)
                elif kind == "open":
                    self._opened(shard, outcome)
                else:
                    self._computed(shard, outcome, ids)
            unsettled = sum(1 for state in runs for shard in state.shards if shard.status in ("pending", "running"))

    def _assign(self, shard: _Shard) -> None:
        """Open `shard` on a free worker, preferring one that holds its model already."""
        model = (shard.run.config.model, shard.run.config.dtype, shard.run.config.device)
        slot = next((s for s in self.free if self.models.get(s) == model), self.free[0])
        self.free.remove(slot)
        self.models[slot] = model
        shard.slot, shard.status, shard.attempts = slot, "running", shard.attempts + 1
        shard.began = shard.began or time.time()
        self._call(shard, "open", [], shard.key, shard.run.config, shard.k_of_n)

    def _call(self, shard: _Shard, method: str, ids: list[str], *args: Any) -> None:
        handle = self.pool.call(shard.slot, method, *args)
        self.calls[handle] = (shard, shard.attempts, method, ids)
        shard.in_flight.add(handle)

    def _opened(self, shard: _Shard, opened: Opened) -> None:
        """Start (or resume) the run in the store on its first shard, then send the shard's unstored samples."""
        state = shard.run
        self.timing["load"] += opened.seconds
        if state.handle is None:
            try:
                state.handle, stored = self.writer.call(lambda db: _start(db, state.config, opened)).result()
            except StoreError as exc:
                for other in state.shards:
                    self._settle(other, "failed", first_line(exc))
                self._release(shard)
                return
            state.stored, state.dataset_skips, state.metrics = stored, opened.skipped, opened.metrics
            state.total = opened.total
        if not shard.opened:
            shard.opened, shard.ids = True, list(opened.ids)
            state.ids.update(opened.ids)
        todo = [i for i in opened.ids if i not in state.stored and i not in state.skipped_ids]
        size = state.config.batch_size
        shard.batches = [todo[i:i + size] for i in range(0, len(todo), size)]
        self.emit(Event("open", state.name, shard.shard, *self._count(state),
                        text=f"{opened.where}, {len(todo)} to compute"))
        self._feed(shard)

    def _computed(self, shard: _Shard, batches: list[Computed], ids: list[str]) -> None:
        """Hand one batch's results to the writer; a sample that did not come back fails the shard."""
        state = shard.run
        returned = set()
        for batch in batches:
            for sample_id, reason in batch.skipped:
                returned.add(sample_id)
                if sample_id not in state.skipped_ids:
                    state.skipped_ids.add(sample_id)
                    state.skipped[skip_reason(reason)] += 1
                    log.warning("run %s: skipped sample %s: %s", state.name, sample_id, reason)
            if batch.figures is not None:
                self.writer.submit(batch.rows, batch.figures, run=state.handle)
                new = [row["sample_id"] for row in batch.rows]
                returned.update(new)
                state.stored.update(new)
                shard.samples += len(new)
                state.new += len(new)
        missing = set(ids) - returned
        if missing:
            self._fail(shard, Failure(f"{len(missing)} sample(s) of a batch did not come back from the worker"))
            return
        self.emit(Event("progress", state.name, shard.shard, *self._count(state)))
        self._feed(shard)

    def _feed(self, shard: _Shard) -> None:
        """Keep two batches queued at the shard's worker; when none is left, the shard is done."""
        while shard.batches and len(shard.in_flight) < IN_FLIGHT:
            ids = shard.batches.pop(0)
            self._call(shard, "compute", ids, shard.key, ids)
        if not shard.batches and not shard.in_flight:
            self.pool.call(shard.slot, "close", shard.key)
            self._release(shard)
            self._settle(shard, "done")

    def _fail(self, shard: _Shard, failure: Failure) -> None:
        """Try the shard again on a worker (it resumes after what is stored) or, out of tries, fail it."""
        slot = shard.slot
        if failure.lost and slot is not None:
            what = self.pool.replace(slot)
            self.emit(Event("worker", text=f"worker {slot + 1} replaced: {what}"))
        self._release(shard)
        shard.in_flight.clear()
        if failure.retry and shard.attempts <= self.retries:
            shard.status = "pending"
            self.pending.appendleft(shard)
            self.emit(Event("failure", shard.run.name, shard.shard, text=f"{failure.reason} (trying again, "
                            f"{shard.attempts} of {self.retries} retries)"))
            return
        self._settle(shard, "failed", failure.reason)

    def _release(self, shard: _Shard) -> None:
        if shard.slot is not None and shard.slot not in self.free:
            self.free.append(shard.slot)
        shard.slot = None

    def _settle(self, shard: _Shard, status: str, error: str = "") -> None:
        """Close a shard; when it was its run's last, finish the run in the store."""
        if shard.status in ("done", "failed"):
            return
        if shard in self.pending:
            self.pending.remove(shard)
        shard.status, shard.error, shard.seconds = status, error, time.time() - (shard.began or time.time())
        self._release(shard)
        if error:
            self.emit(Event("failure", shard.run.name, shard.shard, text=error))
        state = shard.run
        if state.handle is None or any(j.status in ("pending", "running") for j in state.shards):
            return
        ok = all(j.status == "done" for j in state.shards)
        skipped = _add(state.dataset_skips, state.skipped)
        expected = state.ids - state.skipped_ids
        state.summary, missing = self.writer.call(
            lambda db: _finish(db, state, skipped, expected, ok)).result()
        if missing:
            for j in state.shards:
                j.status, j.error = "failed", f"{missing} sample(s) never reached the store"
        status = "done" if ok and not missing else "failed"
        accuracy = state.summary.accuracy if state.summary else None
        self.emit(Event("finished", state.name, "", *self._count(state),
                        text=status + ("" if accuracy is None else f", accuracy {accuracy:.3f}")))

    def _count(self, state: _Run) -> tuple[int, int, int]:
        """(samples stored, samples of the run, stored by this sweep) of a run."""
        total = len(state.ids) if state.total is None else state.total
        return len(state.stored & state.ids), total - len(state.skipped_ids), state.new


def _add(a: dict[str, int], b: Counter[str]) -> dict[str, int]:
    total = Counter(a)
    total.update(b)
    return dict(total)


def _start(db: Store, config: RunConfig, opened: Opened) -> tuple[RunHandle, set[str]]:
    """Create or resume the run in the store (on the writer's thread) with the row its worker settled, as `vheads run`
    does; its handle and the samples it has."""
    handle = db.start_run(str(config.name), **opened.row, resume=True)
    return handle, set(handle.done_ids)


def _finish(db: Store, state: _Run, skipped: dict[str, int], expected: set[str], ok: bool
            ) -> tuple[RunSummary | None, int]:
    """Close the run (on the writer's thread, after its batches): done only when every sample is stored."""
    handle = state.handle
    missing = len(expected - handle.done_ids)
    if not ok or missing:
        db.finish_run(handle, status="failed", skipped=skipped)
        return None, missing
    summary = summarize(db, handle, db.path, skipped, state.metrics, time.time() - state.began)
    db.finish_run(handle, status="done", accuracy=summary.accuracy, skipped=skipped)
    for shard in state.shards:
        shard.accuracy = _accuracy(db, handle, shard.ids)
    return summary, 0


def _accuracy(db: Store, handle: RunHandle, ids: Sequence[str]) -> float | None:
    """The accuracy over the scored samples among `ids` of a run (one shard's own; None when none is scored)."""
    row = db.query("SELECT count(correct) AS scored, count(*) FILTER (WHERE correct) AS correct FROM samples "
                   "WHERE run_id = ? AND list_contains(?::TEXT[], sample_id)", [handle.run_id, list(ids)]).iloc[0]
    return int(row["correct"]) / int(row["scored"]) if row["scored"] else None


def _pool(local: bool, address: str | None, gpus_per_task: float | None, cpus_per_task: float,
          num_cpus: int | None, timing: dict[str, float]) -> tuple[Any, Callable[[], None]]:
    """The workers' pool and how to stop what was started for it; the time taken to start Ray in `timing`."""
    if local:
        return LocalPool(), lambda: None
    try:
        import ray
    except ImportError:
        raise SweepError("Ray is not installed: install vheads[ray] or pass --no-ray") from None
    began = time.perf_counter()
    started = not ray.is_initialized()
    if started:
        _init_ray(ray, address, num_cpus)
    timing["start"] = time.perf_counter() - began
    return RayPool(ray, gpus_per_task, cpus_per_task), (ray.shutdown if started else lambda: None)


def _init_ray(ray: Any, address: str | None, num_cpus: int | None) -> None:
    """Connect to the cluster at `address`, or start a local Ray without dashboard or worker log forwarding.

    A local start is tried three times: Ray gives its node 30 s to come up, which a busy machine can miss.
    """
    tries = 1 if address else 3
    for attempt in range(1, tries + 1):
        try:
            if address:
                ray.init(address=address, logging_level=logging.WARNING, log_to_driver=False)
            else:
                ray.init(num_cpus=num_cpus or os.cpu_count() or 1, include_dashboard=False, log_to_driver=False,
                         logging_level=logging.WARNING)
            return
        except Exception as exc:  # noqa: BLE001 - every start failure becomes one line
            ray.shutdown()
            if attempt == tries:
                where = f"the Ray cluster at {address}" if address else "a local Ray"
                raise SweepError(f"cannot start {where}: {first_line(exc)}") from exc
            log.warning("a local Ray did not start (%s); trying again", first_line(exc))


def _stored(runs: Sequence[RunConfig], store: Path) -> tuple[dict[str, dict[str, Any]], dict[str, str]]:
    """The planned runs the store holds already: those done with the same defining settings (kept, not computed
    again) and those whose settings differ (refused, with the reason: a run's settings never change under it)."""
    if not store.is_file():
        return {}, {}
    try:
        with Store(store, read_only=True) as db:
            frame = db.runs()
    except StoreError:
        return {}, {}
    infos = {row["name"]: row for row in frame.to_dict("records")}
    kept, refused = {}, {}
    for config in runs:
        info = infos.get(config.name)
        if info is None:
            continue
        try:
            check_same_run(str(config.name), config, info["config"] or {},
                           hint="a run's settings never change: put them back to continue it, or sweep into another "
                                "--store")
        except StoreError as exc:
            refused[str(config.name)] = str(exc)
            continue
        if info["status"] == "done":
            kept[str(config.name)] = info
    return kept, refused


def _log_event(event: Event) -> None:
    """Without a live view: failures as warnings, the rest as info lines."""
    text = f"{event.run} {event.shard} {event.kind}: {event.text}".strip()
    (log.warning if event.kind == "failure" else log.info)(text)


def _row(shard: _Shard) -> dict[str, Any]:
    return {"run": shard.run.name, "model": model_label(shard.run.config.model), "dataset": shard.run.config.dataset,
            "shard": shard.shard, "status": shard.status, "samples": shard.samples, "accuracy": shard.accuracy,
            "seconds": round(shard.seconds, 1), "error": shard.error}


def _kept_row(config: RunConfig, info: dict[str, Any]) -> dict[str, Any]:
    accuracy = info.get("accuracy")
    return {"run": config.name, "model": model_label(config.model), "dataset": config.dataset, "shard": "kept",
            "status": "done", "samples": 0, "accuracy": None if pd.isna(accuracy) else float(accuracy),
            "seconds": 0.0, "error": ""}


__all__ = ["COLUMNS", "Event", "SweepError", "SweepResult", "absolute", "model_label", "parse_dataset", "plan",
           "run_name", "run_sweep"]
