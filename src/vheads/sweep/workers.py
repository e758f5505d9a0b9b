"""Where a sweep's batches are computed: a `Worker` keeps a model loaded and turns sample ids into per-sample results.

Workers never touch the store: what they compute goes back to the driver, its one writer. A pool holds the
workers: `RayPool` as Ray actors (one per GPU, or per `cpus_per_task` CPUs), `LocalPool` as one worker in
this process. Both answer `call(slot, method, *args)` with a handle, and `wait(handles)` with the outcomes;
every outcome is the method's value or a `Failure`, never an exception.
"""

from __future__ import annotations

import gc
import os
import socket
import time
from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from typing import Any

from vheads.capture import CaptureError
from vheads.data import DataError
from vheads.models import Loaded, ModelError
from vheads.pipeline.batches import Computed, Runner, compute
from vheads.pipeline.config import RunConfig, settle, shard_samples
from vheads.store import StoreError

BAD_INPUT = (DataError, ModelError, StoreError, CaptureError, ValueError, FileNotFoundError)


@dataclass
class Failure:
    """A worker call that failed: the reason in one line, whether trying again may help, whether the worker died."""

    reason: str
    retry: bool = True
    lost: bool = False


@dataclass
class Opened:
    """What a worker reports about a shard of a run it opened: the run's row for the store (`PreparedRun.row`:
    its model, dataset and grid, its stored settings), the shard's sample ids and how many samples the whole run
    has (`total`)."""

    row: dict[str, Any]
    ids: list[str]
    skipped: dict[str, int]
    metrics: tuple[str, ...]
    where: str
    seconds: float
    total: int


class ModelCache:
    """The last loaded model, reused by the following shards of work on that model."""

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


class Worker:
    """Computes batches for the driver, loading each model once for all the batches and shards it serves."""

    def __init__(self, threads: int | None = None) -> None:
        if threads:
            import torch

            torch.set_num_threads(threads)
        self.models = ModelCache()
        self.dataset_key: tuple[Any, ...] | None = None
        self.dataset: Any = None
        self.shards: dict[Hashable, tuple[Runner, dict[str, Any], int]] = {}

    def open(self, key: Hashable, config: RunConfig, shard: tuple[int, int] | None) -> Opened | Failure:
        """Load the model and dataset of `config` (kept from the last call when the same), settle the run on them as
        `vheads run` does (`settle`: heads and stages checked against the model, its row) and take its shard."""
        try:
            began = time.perf_counter()
            plan = settle(config, self.models.get(config), self._dataset(config))
            samples = shard_samples(plan.samples, shard)
            self.shards[key] = (Runner(plan.loaded, plan.config), {s.id: s for s in samples}, config.batch_size)
            return Opened(plan.row, [s.id for s in samples], dict(plan.dataset.skip_summary()), plan.dataset.metrics,
                          f"{socket.gethostname()}:{os.getpid()}", time.perf_counter() - began, len(plan.samples))
        except Exception as exc:  # noqa: BLE001 - reported to the driver as a failure
            return failure(exc)

    def compute(self, key: Hashable, ids: Sequence[str]) -> list[Computed] | Failure:
        """Answer and measure the samples `ids` of an opened shard (one batch, halved on out-of-memory)."""
        try:
            runner, samples, batch_size = self.shards[key]
            return list(compute(runner, [samples[i] for i in ids], batch_size))
        except Exception as exc:  # noqa: BLE001 - reported to the driver as a failure
            return failure(exc)

    def close(self, key: Hashable) -> None:
        """Forget an opened shard (its model stays loaded for the next shard)."""
        self.shards.pop(key, None)

    def _dataset(self, config: RunConfig) -> Any:
        key = (config.dataset, config.data, config.images, config.split, config.question_type, config.prompt_style,
               config.limit, config.seed)
        if key != self.dataset_key:
            self.dataset, self.dataset_key = config.load_dataset(), key
        return self.dataset


def failure(exc: BaseException, lost: bool = False) -> Failure:
    """A failure naming the exception in one line; bad input (a missing file, a bad option) is not retried."""
    return Failure(first_line(exc), retry=not isinstance(exc, BAD_INPUT), lost=lost)


def first_line(exc: BaseException) -> str:
    """'ModelError: model path /x does not exist': the exception's type and the first line of its message."""
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0]}" if text else type(exc).__name__


class LocalPool:
    """One worker in this process: a call runs at once, and its outcome waits for `wait`."""

    def __init__(self) -> None:
        self.worker = Worker()
        self.outcomes: dict[int, Any] = {}
        self.slots: list[int] = []
        self.calls = 0

    def capacity(self) -> int:
        """How many workers may run at once: one."""
        return 1

    def start(self) -> tuple[int, str]:
        """Add the worker (there is only one); returns its slot and what it runs on."""
        self.slots.append(0)
        return 0, "this process"

    def call(self, slot: int, method: str, *args: Any) -> int:
        """Run `method` of the worker now; returns the handle its outcome waits under."""
        self.calls += 1
        self.outcomes[self.calls] = getattr(self.worker, method)(*args)
        return self.calls

    def wait(self, handles: Sequence[int], timeout: float) -> list[tuple[int, Any]]:
        """The outcomes of the given handles (all are ready)."""
        return [(h, self.outcomes.pop(h)) for h in handles if h in self.outcomes]

    def replace(self, slot: int) -> str:
        """Nothing to replace: the worker in this process does not die alone."""
        return "this process"

    def shutdown(self) -> None:
        """Drop the worker and its model."""
        self.worker = Worker()


class RayPool:
    """Workers as Ray actors, each holding one GPU (or `cpus_per_task` CPUs), started as the cluster has room."""

    def __init__(self, ray: Any, gpus_per_task: float | None, cpus_per_task: float) -> None:
        self.ray = ray
        self.gpus_per_task = gpus_per_task
        self.cpus_per_task = cpus_per_task
        self.actor_class = ray.remote(max_restarts=0, max_task_retries=0)(Worker)
        self.actors: dict[int, Any] = {}

    def slot_size(self) -> tuple[float, int]:
        """GPUs each new actor takes and how many such actors the cluster holds now (read at every call)."""
        resources = self.ray.cluster_resources()
        gpus = self.gpus_per_task
        if gpus is None:
            gpus = 1.0 if resources.get("GPU", 0) >= 1 else 0.0
        if gpus > 0:
            return gpus, max(1, int(resources.get("GPU", 0) // gpus))
        return 0.0, max(1, int(resources.get("CPU", 0) // self.cpus_per_task))

    def capacity(self) -> int:
        """How many actors the cluster holds now."""
        return self.slot_size()[1]

    def start(self) -> tuple[int, str]:
        """Start one more actor; returns its slot and what it holds."""
        slot = len(self.actors)
        return slot, self._start(slot)

    def call(self, slot: int, method: str, *args: Any) -> Any:
        """Queue `method` on the slot's actor; returns the Ray object reference of its outcome."""
        return getattr(self.actors[slot], method).remote(*args)

    def wait(self, handles: Sequence[Any], timeout: float) -> list[tuple[Any, Any]]:
        """The outcomes ready within `timeout` seconds; a result that cannot arrive (dead actor) is a lost `Failure`."""
        first, _ = self.ray.wait(list(handles), num_returns=1, timeout=timeout)
        if not first:
            return []
        ready, _ = self.ray.wait(list(handles), num_returns=len(handles), timeout=0)
        outcomes = []
        for ref in ready:
            try:
                outcomes.append((ref, self.ray.get(ref)))
            except Exception as exc:  # noqa: BLE001 - a worker that died fails its shard only
                outcomes.append((ref, failure(exc, lost=True)))
        return outcomes

    def replace(self, slot: int) -> str:
        """Kill the slot's actor (it died or hangs) and start a fresh one in its place."""
        self.ray.kill(self.actors.pop(slot), no_restart=True)
        return self._start(slot)

    def shutdown(self) -> None:
        """Stop every actor."""
        for actor in self.actors.values():
            self.ray.kill(actor, no_restart=True)
        self.actors.clear()

    def _start(self, slot: int) -> str:
        gpus, _ = self.slot_size()
        threads = None if gpus else max(1, int(self.cpus_per_task))
        self.actors[slot] = self.actor_class.options(num_cpus=self.cpus_per_task, num_gpus=gpus).remote(threads)
        if gpus:
            return f"{gpus:g} GPU"
        return f"{self.cpus_per_task:g} CPU" + (", no GPU in the cluster" if self.gpus_per_task is None else "")


__all__ = ["Failure", "LocalPool", "ModelCache", "Opened", "RayPool", "Worker", "failure", "first_line"]
