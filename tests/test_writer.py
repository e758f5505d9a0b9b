"""The background batch writer: every submitted batch lands, in order, even when the run stops; between batches
other processes read what it stored."""

from __future__ import annotations

import subprocess
import sys
import threading

import numpy as np
import pytest
from test_store import HEADS, LAYERS, fake_batch, start

from vheads.capture import HeadFigures
from vheads.pipeline.writer import BatchWriter
from vheads.store import Store, StoreError


def figures_of(*arrays: np.ndarray) -> HeadFigures:
    n = len(arrays[0])
    names = ("visual_weight", "concentration", "region_weight", "text_weight", "sink_weight")
    return HeadFigures(np.full(n, 16), np.ones(n, dtype=np.int64), **dict(zip(names, arrays, strict=False)))


def test_every_submitted_batch_is_stored_in_order_before_close_returns(tmp_path):
    stored_by = []
    with Store(tmp_path / "s.duckdb") as store:
        run = start(store)
        with BatchWriter(store, run, on_stored=lambda rows: stored_by.append(
                (threading.current_thread().name, [r["sample_id"] for r in rows]))) as writer:
            for lo in range(0, 12, 4):
                samples, *arrays = fake_batch(list(range(lo, lo + 4)))
                writer.submit(samples, figures_of(*arrays))
        frame = store.head_stats(run)
        assert len(store.samples(run)) == 12
    assert len(frame) == 12 * LAYERS * HEADS
    assert [ids[0] for _, ids in stored_by] == ["s00000", "s00004", "s00008"]
    assert all(name != threading.current_thread().name for name, _ in stored_by), "written off the caller's thread"


def test_batches_computed_before_an_interrupt_are_still_stored(tmp_path):
    with Store(tmp_path / "s.duckdb") as store:
        run = start(store)
        with pytest.raises(KeyboardInterrupt), BatchWriter(store, run) as writer:
            for lo in range(0, 8, 4):
                samples, *arrays = fake_batch(list(range(lo, lo + 4)))
                writer.submit(samples, figures_of(*arrays))
            raise KeyboardInterrupt
        assert sorted(store.samples(run)["sample_id"]) == [f"s{i:05d}" for i in range(8)]


def test_a_failed_write_is_raised_in_the_caller_and_stops_the_writer(tmp_path):
    with Store(tmp_path / "s.duckdb") as store:
        run = start(store)
        writer = BatchWriter(store, run)
        good, *arrays = fake_batch([0, 1])
        writer.submit(good, figures_of(*arrays))
        bad, *wrong = fake_batch([2, 3], layers=LAYERS + 1)
        writer.submit(bad, figures_of(*wrong))
        later, *arrays = fake_batch([4, 5])
        with pytest.raises(StoreError, match="visual_weight has shape"):
            writer.submit(later, figures_of(*arrays))
            writer.close()
        with pytest.raises(StoreError):
            writer.close()
        assert list(store.samples(run)["sample_id"]) == ["s00000", "s00001"]


def test_other_processes_read_the_batches_stored_while_the_writer_waits_for_the_next(tmp_path):
    path = tmp_path / "s.duckdb"
    stored = threading.Event()
    with Store(path) as store:
        run = start(store)
        with BatchWriter(store, run, on_stored=lambda rows: stored.set()) as writer:
            samples, *arrays = fake_batch([0, 1, 2])
            writer.submit(samples, figures_of(*arrays))
            assert stored.wait(30)
            count = subprocess.run(
                [sys.executable, "-c", "import sys; from vheads.store import Store\n"
                 "with Store(sys.argv[1], read_only=True) as db:\n"
                 "    print(len(db.samples('r')), len(db.head_stats('r')))", str(path)],
                capture_output=True, text=True, timeout=120)
            assert count.stdout.split() == ["3", str(3 * LAYERS * HEADS)], count.stderr
            samples, *arrays = fake_batch([3])
            writer.submit(samples, figures_of(*arrays))
        assert len(store.samples(run)) == 4
