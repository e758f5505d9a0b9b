"""`vheads sweep`: many models x datasets (x shards) as one task each, on Ray or in-process, merged into one store.

Every task writes its own DuckDB file (DuckDB allows one writer per file) under the work folder, named after
its run and shard; the shards of one (model, dataset) share a run name, so merging folds them into one run.
On a multi-machine Ray cluster the work folder must be a filesystem every node reaches (NFS, a mounted
bucket), and so must the models and data files.
"""

from __future__ import annotations

import gc
import json
import logging
import os
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import pandas as pd

from vheads import settings as run_settings
from vheads.models import Loaded
from vheads.pipeline import Interrupted, RunConfig, base_name, run
from vheads.store import MergeSummary, Store, StoreError, merge

log = logging.getLogger("vheads.sweep")

DEMO = "demo"
COLUMNS = ("run", "model", "dataset", "shard", "status", "samples", "accuracy", "seconds", "error")


class SweepError(Exception):
    """A sweep cannot start (Ray missing or unreachable); one line the user can act on."""


@dataclass
class TaskResult:
    """What one (model, dataset, shard) task reports back: its run's state in its own file, or why it failed."""

    status: str
    samples: int = 0
    accuracy: float | None = None
    seconds: float = 0.0
    error: str = ""


@dataclass
class SweepResult:
    """A sweep's tasks (one row each, see `COLUMNS`) and the merge of each run into the store."""

    tasks: pd.DataFrame
    merges: list[MergeSummary] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """Every task finished and every run merged."""
        return bool((self.tasks["status"] == "done").all())


def parse_dataset(text: str) -> tuple[str, str | None]:
    """'pope:/data/pope.jsonl' -> ('pope', '/data/pope.jsonl'); a bare name has no data file."""
    name, _, data = text.strip().partition(":")
    if not name:
        raise ValueError(f"--datasets: {text!r} has no dataset name (NAME or NAME:PATH)")
    return name.lower(), data or None


def model_label(model: str | None) -> str:
    """The short model name used in run names: the folder or hub repo name, `demo` for the embedded model."""
    if model in (None, "", DEMO):
        return DEMO
    return Path(str(model).rstrip("/\\")).name or str(model)


def run_name(model: str | None, dataset: str, base: RunConfig) -> str:
    """`<model>-<dataset>[-<split>][-<readout>][-<ablation>K]`, the same for every shard of one (model, dataset)."""
    return base_name(model_label(model), replace(base, dataset=dataset), base.split)


def task_folder(store: str | Path, workdir: str | Path | None = None) -> Path:
    """Where the task files of a sweep into `store` go: `<workdir>/<store name>-sweep/` (workdir: the store's)."""
    store = Path(store)
    return Path(workdir if workdir is not None else store.parent) / f"{store.stem}-sweep"


def plan(models: Sequence[str | None], datasets: Sequence[str], shards: int, base: RunConfig,
         workdir: str | Path | None = None) -> list[RunConfig]:
    """One resumable config per (model, dataset, shard), each writing its own file under `task_folder`.

    `datasets` are names or NAME:PATH. Raises ValueError when two (model, dataset) pairs would share a run name.
    """
    if shards < 1:
        raise ValueError(f"--shards must be at least 1, got {shards}")
    if not models or not datasets:
        raise ValueError("a sweep needs at least one model and one dataset")
    folder = task_folder(base.store, workdir)
    configs: list[RunConfig] = []
    seen: dict[str, tuple[str | None, str]] = {}
    for model in models:
        for text in datasets:
            dataset, data = parse_dataset(text)
            name = run_name(model, dataset, base)
            if name in seen:
                raise ValueError(f"{seen[name]} and {(model, text)} would both be run {name!r}; "
                                 "give the models distinct folder names and each dataset once")
            seen[name] = (model, text)
            store = folder / (re.sub(r"[^\w.-]", "_", name) + ".duckdb")
            for k in range(1, shards + 1):
                configs.append(replace(base, model=model, dataset=dataset, data=data or base.data, name=name,
                                       store=str(store), shard=(k, shards) if shards > 1 else None, resume=True))
    return configs


def run_task(config: RunConfig, models: ModelCache | None = None) -> TaskResult:
    """Run one task into its own file and report it; any error becomes a failed result, never an exception."""
    began = time.time()
    try:
        config.store_path().parent.mkdir(parents=True, exist_ok=True)
        summary = run(config, loaded=models.get(config) if models else None)
    except Interrupted:
        raise
    except Exception as exc:  # noqa: BLE001 - one failed task must not stop the sweep
        return TaskResult("failed", seconds=time.time() - began, error=_first_line(exc))
    return TaskResult(summary.status, summary.samples, summary.accuracy, time.time() - began)


class ModelCache:
    """The last loaded model, reused by consecutive in-process tasks of that model (a sweep's shards)."""

    def __init__(self) -> None:
        self.key: tuple[Any, ...] | None = None
        self.loaded: Loaded | None = None

    def get(self, config: RunConfig) -> Loaded:
        """The model `config` names, loading it (and dropping the previous one) when it changed."""
        key = (config.model, config.dtype, config.device, config.attn, config.trust_remote_code)
        if key != self.key or self.loaded is None:
            self.key, self.loaded = None, None
            gc.collect()
            self.loaded, self.key = config.load_model(), key
        return self.loaded


def finished(config: RunConfig) -> TaskResult | None:
    """The task's result when its file already holds its run, done, with the same settings (a re-run skips it)."""
    path = config.store_path()
    if not path.is_file():
        return None
    try:
        with Store(path, read_only=True) as store:
            runs = store.runs()
            if not len(runs) or config.name not in set(runs["name"]):
                return None
            info = store.run(config.name)
    except StoreError:
        return None
    stored = {k: v for k, v in (info["config"] or {}).items() if k not in run_settings.DERIVED}
    if info["status"] != "done" or stored != _settings(config):
        return None
    accuracy = info.get("accuracy")
    return TaskResult("done", int(info.get("n_samples") or 0), None if pd.isna(accuracy) else float(accuracy))


def run_sweep(configs: Sequence[RunConfig], into: str | Path, address: str | None = None,
              gpus_per_task: float | None = None, cpus_per_task: float = 1, num_cpus: int | None = None,
              local: bool = False) -> SweepResult:
    """Run every task (on Ray, or one after another in-process with `local`), then merge each run into `into`.

    `address`: a Ray cluster ("auto", "ray://host:10001"); none starts a local Ray on `num_cpus` CPUs (default:
    all). `gpus_per_task` None means one GPU per task when the cluster has GPUs, else none. Tasks already done
    with the same settings are not run again; a failed task is reported in its row and the others go on.
    """
    results: dict[int, TaskResult] = {}
    for config in configs:
        kept = finished(config)
        if kept is not None:
            results[id(config)] = kept
    todo = [c for c in configs if id(c) not in results]
    if todo:
        runner = _run_local if local else _ray_runner(address, gpus_per_task, cpus_per_task, num_cpus)
        results.update(runner(todo))
    rows = [_row(c, results[id(c)]) for c in configs]
    merges = _merge_runs(configs, rows, Path(into))
    return SweepResult(pd.DataFrame(rows, columns=list(COLUMNS)), merges)


def _run_local(configs: Sequence[RunConfig]) -> dict[int, TaskResult]:
    """Run the tasks one after another in this process, reusing a loaded model across its shards."""
    models = ModelCache()
    results = {}
    for i, config in enumerate(configs, 1):
        results[id(config)] = result = run_task(config, models)
        _log_task(i, len(configs), config, result)
    return results


def _ray_runner(address: str | None, gpus_per_task: float | None, cpus_per_task: float,
                num_cpus: int | None) -> Callable[[Sequence[RunConfig]], dict[int, TaskResult]]:
    """A function running tasks on Ray: the given cluster, or a local Ray with a small footprint."""
    try:
        import ray
    except ImportError:
        raise SweepError("Ray is not installed: install vheads[ray] or pass --no-ray") from None

    def run_on_ray(configs: Sequence[RunConfig]) -> dict[int, TaskResult]:
        started = not ray.is_initialized()
        if started:
            _init_ray(ray, address, num_cpus)
        try:
            gpus = gpus_per_task
            if gpus is None:
                gpus = 1 if ray.cluster_resources().get("GPU", 0) > 0 else 0
            remote = ray.remote(num_cpus=cpus_per_task, num_gpus=gpus, max_retries=1)(run_task)
            pending = {remote.remote(config): config for config in configs}
            results: dict[int, TaskResult] = {}
            while pending:
                ready, _ = ray.wait(list(pending), num_returns=1)
                config = pending.pop(ready[0])
                try:
                    result = ray.get(ready[0])
                except Exception as exc:  # noqa: BLE001 - a crashed worker fails its task only
                    result = TaskResult("failed", error=_first_line(exc))
                results[id(config)] = result
                _log_task(len(results), len(configs), config, result)
            return results
        except KeyboardInterrupt:
            raise Interrupted("sweep interrupted; run the same command again to continue it") from None
        finally:
            if started:
                ray.shutdown()

    return run_on_ray


def _init_ray(ray: Any, address: str | None, num_cpus: int | None) -> None:
    """Connect to the cluster at `address`, or start a local Ray without dashboard or worker log forwarding."""
    try:
        if address:
            ray.init(address=address, logging_level=logging.WARNING)
        else:
            ray.init(num_cpus=num_cpus or os.cpu_count() or 1, include_dashboard=False, log_to_driver=False,
                     logging_level=logging.WARNING)
    except Exception as exc:  # noqa: BLE001 - every start failure becomes one line
        where = f"the Ray cluster at {address}" if address else "a local Ray"
        raise SweepError(f"cannot start {where}: {_first_line(exc)}") from exc


def _merge_runs(configs: Sequence[RunConfig], rows: list[dict[str, Any]], into: Path) -> list[MergeSummary]:
    """Merge each run's task files into the store, one run at a time so one bad run does not block the others."""
    groups: dict[str, list[int]] = {}
    for i, config in enumerate(configs):
        groups.setdefault(str(config.name), []).append(i)
    merges = []
    into.parent.mkdir(parents=True, exist_ok=True)
    for indices in groups.values():
        files = sorted({configs[i].store_path() for i in indices if configs[i].store_path().is_file()})
        if not files:
            continue
        try:
            merges.append(merge(files, into))
        except StoreError as exc:
            log.warning("run %s not merged: %s", configs[indices[0]].name, _first_line(exc))
            for i in indices:
                rows[i].update(status="merge failed", error=rows[i]["error"] or _first_line(exc))
    return merges


def _log_task(i: int, total: int, config: RunConfig, result: TaskResult) -> None:
    """One line per finished task: info when it is done, a warning with the reason when not."""
    shard = "{}/{}".format(*(config.shard or (1, 1)))
    if result.error:
        log.warning("task %d/%d %s %s %s: %s", i, total, config.name, shard, result.status, result.error)
    else:
        log.info("task %d/%d %s %s %s (%d samples)", i, total, config.name, shard, result.status, result.samples)


def _row(config: RunConfig, result: TaskResult) -> dict[str, Any]:
    k, n = config.shard or (1, 1)
    return {"run": config.name, "model": model_label(config.model), "dataset": config.dataset, "shard": f"{k}/{n}",
            "status": result.status, "samples": result.samples, "accuracy": result.accuracy,
            "seconds": round(result.seconds, 1), "error": result.error}


def _settings(config: RunConfig) -> dict[str, Any]:
    """The settings a run stores, as read back from its file (the pipeline drops store, name, resume and tags)."""
    settings = {k: v for k, v in asdict(config).items() if k not in ("store", "name", "resume", "tags")}
    return json.loads(json.dumps(settings, sort_keys=True, default=str))


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0]}" if text else type(exc).__name__


__all__ = ["COLUMNS", "SweepError", "SweepResult", "TaskResult", "model_label", "parse_dataset", "plan",
           "run_name", "run_sweep", "run_task", "task_folder"]
