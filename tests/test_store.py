"""The results store: runs, batches, resume after a kill, locking, shards and merge, export."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from vheads.pipeline.config import differences
from vheads.store import HEAD_FIELDS, RunHandle, Store, StoreError, check_writable, merge, shard_path

LAYERS, HEADS = 4, 3
SETTINGS = dict(
    model="tiny-llava",
    family="llava",
    dataset="shapesqa",
    split="test",
    layers=LAYERS,
    heads=HEADS,
    readout="prompt",
    ablation="none",
    config={"batch_size": 4},
)


def fake_batch(indices: list[int], layers: int = LAYERS, heads: int = HEADS) -> tuple[list[dict], ...]:
    """Samples s00000, s00001, ... with figures that depend only on the sample index, so any copy can be checked."""
    samples = [
        {
            "sample_id": f"s{i:05d}",
            "question_type": "general",
            "prompt_style": "visual",
            "question": f"How many shapes in image {i}?",
            "prediction": str(i % 3),
            "answer": i % 2,
            "correct": np.bool_(i % 3 == i % 2),
            "image_tokens": np.int64(16),
            "region_tokens": 4,
            "meta": {"seed": i},
        }
        for i in indices
    ]
    base = np.asarray(indices, dtype=np.float32)[:, None, None]
    grid = np.arange(layers * heads, dtype=np.float32).reshape(1, layers, heads)
    visual = (base + grid) / 1000.0
    arrays = (visual, visual / 2, visual / 4, 1 - visual, np.full_like(visual, 0.25))
    return samples, *arrays


def start(store: Store, name: str = "r", **overrides) -> RunHandle:
    return store.start_run(name, **{**SETTINGS, **overrides})


def run_python(code: str, *args: str) -> subprocess.Popen:
    """A real second process (importing this test module for `fake_batch`), its stdout readable line by line."""
    prelude = f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r})\n"
    return subprocess.Popen(
        [sys.executable, "-c", prelude + textwrap.dedent(code), *args],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )


def test_a_run_is_written_in_batches_and_read_back(tmp_path):
    with Store(tmp_path / "vheads.duckdb") as store:
        run = start(store, "demo")
        assert run.done_ids == set() and not run.resumed
        assert store.add_batch(run, *fake_batch([0, 1, 2])) == 3
        assert store.add_batch(run, *fake_batch([3, 4])) == 2
        assert store.run("demo")["status"] == "running"
        store.finish_run(run, accuracy=0.4, skipped={"missing_image": 1})

        info = store.run("demo")
        assert info["status"] == "done" and info["n_samples"] == 5 and info["accuracy"] == 0.4
        assert info["config"] == {"batch_size": 4} and info["skipped"] == {"missing_image": 1}
        assert info["finished"] >= info["started"]
        assert store.run(info["run_id"])["name"] == "demo"
        assert list(store.runs()["name"]) == ["demo"]

        samples = store.samples("demo")
        assert list(samples["sample_id"]) == [f"s{i:05d}" for i in range(5)]
        assert list(samples["answer"]) == ["0", "1", "0", "1", "0"]
        assert samples["meta"][3] == {"seed": 3}
        heads = store.head_stats(run)
        assert len(heads) == 5 * LAYERS * HEADS
        expected = fake_batch(range(5))[1]
        assert np.allclose(heads["visual_weight"].to_numpy().reshape(5, LAYERS, HEADS), expected)


def test_nan_is_stored_as_null_and_left_out_of_means(tmp_path):
    samples, visual, concentration, region, text, sink = fake_batch([0, 1, 2, 3])
    concentration[0, 1, 2] = np.nan
    concentration[1:, 1, 2] = 0.5
    with Store(tmp_path / "vheads.duckdb") as store:
        run = start(store)
        store.add_batch(run, samples, visual, concentration, None, text, sink)
        nulls = store.query("SELECT count(*) AS n FROM head_stats WHERE concentration IS NULL")
        assert nulls["n"][0] == 1
        assert store.query("SELECT count(*) AS n FROM head_stats WHERE isnan(concentration)")["n"][0] == 0
        assert store.query("SELECT count(region_weight) AS n FROM head_stats")["n"][0] == 0

        means = store.head_means(run).set_index(["layer", "head"])
        assert len(means) == LAYERS * HEADS
        assert means.loc[(1, 2), "concentration"] == pytest.approx(0.5)
        assert means.loc[(1, 2), "n"] == 4 and means.loc[(1, 2), "n_concentration"] == 3
        assert means.loc[(0, 0), "visual_weight"] == pytest.approx(visual[:, 0, 0].mean())


def test_an_existing_name_needs_resume(tmp_path):
    with Store(tmp_path / "vheads.duckdb") as store:
        start(store, "r")
        with pytest.raises(StoreError, match="run r exists; pass --resume"):
            start(store, "r")


def test_resume_skips_stored_samples_and_rejects_other_settings(tmp_path):
    path = tmp_path / "vheads.duckdb"
    with Store(path) as store:
        run = start(store)
        store.add_batch(run, *fake_batch([0, 1, 2]))
    with Store(path) as store:
        assert store.run("r")["status"] == "interrupted"
        with pytest.raises(StoreError, match="model 'tiny-llava' != 'other'"):
            start(store, model="other", resume=True)
        run = start(store, resume=True)
        assert run.resumed and run.done_ids == {"s00000", "s00001", "s00002"}
        assert store.run("r")["status"] == "running"
        assert store.add_batch(run, *fake_batch([2, 3, 3, 4])) == 2
        store.finish_run(run)
        assert store.run("r")["n_samples"] == 5
        assert len(store.head_stats("r")) == 5 * LAYERS * HEADS


def test_a_failed_batch_leaves_nothing_behind(tmp_path, monkeypatch):
    import vheads.store.write

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    with Store(tmp_path / "vheads.duckdb") as store:
        run = start(store)
        store.add_batch(run, *fake_batch([0]))
        monkeypatch.setattr(vheads.store.write, "_head_table", interrupted)
        with pytest.raises(KeyboardInterrupt):
            store.add_batch(run, *fake_batch([1, 2]))
        monkeypatch.undo()
        assert set(store.samples(run)["sample_id"]) == {"s00000"}
        assert len(store.head_stats(run)) == LAYERS * HEADS
        assert store.add_batch(run, *fake_batch([1, 2])) == 2


def test_leaving_the_block_marks_unfinished_runs(tmp_path):
    path = tmp_path / "vheads.duckdb"
    with pytest.raises(RuntimeError), Store(path) as store:
        start(store, "crashes")
        raise RuntimeError("model exploded")
    with pytest.raises(KeyboardInterrupt), Store(path) as store:
        start(store, "stopped")
        raise KeyboardInterrupt
    with Store(path) as store:
        store.mark("stopped", "failed")
        assert dict(zip(store.runs()["name"], store.runs()["status"], strict=True)) == {
            "crashes": "failed",
            "stopped": "failed",
        }
        with pytest.raises(StoreError, match="unknown status"):
            store.mark("stopped", "paused")


def test_unknown_run_lists_the_known_ones(tmp_path):
    with Store(tmp_path / "vheads.duckdb") as store:
        start(store, "llava-pointqa")
        start(store, "llava-pope")
        with pytest.raises(StoreError, match="unknown run 'nope'.*known runs: llava-pointqa, llava-pope"):
            store.run("nope")


def test_a_run_reference_is_read_one_way_or_refused(tmp_path):
    with Store(tmp_path / "vheads.duckdb") as store:
        with pytest.raises(StoreError, match="run name '3' is all digits .* run-3"):
            start(store, "3")
        for name in ("a", "b", "c", "d"):
            start(store, name)
        store.query("UPDATE runs SET name = '3' WHERE name = 'd'")  # as a vheads before this rule could write
        assert store.run(2)["name"] == "b" and store.run("2")["name"] == "b" and store.run("b")["run_id"] == 2
        assert store.run("id:3")["name"] == "c" and store.run("name:3")["run_id"] == 4
        with pytest.raises(StoreError, match="run '3' is ambiguous .*run id 4.*named 'c'; write name:3 or id:3"):
            store.run("3")
        with pytest.raises(StoreError, match="unknown run 'id:9'"):
            store.run("id:9")


WRITER = """
    import sys
    import time
    from test_store import SETTINGS, fake_batch
    from vheads.store import Store, write

    path, total, batch, stall_at = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    insert, inserted = write._insert, []

    def insert_then_maybe_stall(con, run, table, columns, data):
        insert(con, run, table, columns, data)
        inserted.append(table)
        if table == "samples" and inserted.count("samples") == stall_at:
            print("inside a batch", flush=True)
            time.sleep(60)

    write._insert = insert_then_maybe_stall
    with Store(path) as store:
        run = store.start_run("killed", **{**SETTINGS, "layers": 16, "heads": 16}, resume=True)
        todo = [i for i in range(total) if f"s{i:05d}" not in run.done_ids]
        for start in range(0, len(todo), batch):
            store.add_batch(run, *fake_batch(todo[start : start + batch], 16, 16))
            print(len(run.done_ids), flush=True)
        store.finish_run(run)
"""


def kill_writer(path: Path, total: int, batch: int, stall_at: int, lines: int) -> None:
    """Start a writer, let it report `lines` lines, then SIGKILL it."""
    writer = run_python(WRITER, str(path), str(total), str(batch), str(stall_at))
    for _ in range(lines):
        writer.stdout.readline()
    writer.stdout.close()
    os.kill(writer.pid, signal.SIGKILL)
    writer.wait()


def stored_counts(path: Path) -> tuple[int, int, int]:
    with Store(path, read_only=True) as store:
        counts = store.query(
            "SELECT (SELECT n_samples FROM runs) AS n, (SELECT count(*) FROM samples) AS samples, "
            "(SELECT count(*) FROM head_stats) AS heads"
        )
    return counts["n"][0], counts["samples"][0], counts["heads"][0]


def test_a_run_killed_inside_a_batch_keeps_only_whole_batches(tmp_path):
    path = tmp_path / "vheads.duckdb"
    kill_writer(path, total=200, batch=40, stall_at=3, lines=3)
    assert stored_counts(path) == (80, 80, 80 * 256)


def test_a_killed_run_resumes_with_no_duplicate_and_no_lost_row(tmp_path):
    path, total, batch = tmp_path / "vheads.duckdb", 600, 40
    chance = random.Random(7)
    stored = 0
    for _ in range(3):
        kill_writer(path, total, batch, stall_at=0, lines=chance.randint(1, 3))
        n, samples, heads = stored_counts(path)
        assert n == samples > stored and heads == samples * 256
        stored = samples
    assert stored < total

    with Store(path) as store:
        assert store.run("killed")["status"] == "interrupted"
        run = store.start_run("killed", **{**SETTINGS, "layers": 16, "heads": 16}, resume=True)
        assert len(run.done_ids) == stored
        todo = [i for i in range(total) if f"s{i:05d}" not in run.done_ids]
        store.add_batch(run, *fake_batch(todo, 16, 16))
        store.finish_run(run)
        assert store.run("killed")["n_samples"] == total
        counts = store.query(
            """SELECT count(*) AS rows, count(DISTINCT (sample_id, layer, head)) AS distinct_rows,
                      count(DISTINCT sample_id) AS samples, sum(visual_weight)::DOUBLE AS total_w
               FROM head_stats"""
        )
        expected_w = fake_batch(list(range(total)), 16, 16)[1].astype(np.float64).sum()
    assert counts["rows"][0] == counts["distinct_rows"][0] == total * 256
    assert counts["samples"][0] == total
    assert counts["total_w"][0] == pytest.approx(expected_w, rel=1e-6)


HOLDER = """
    import sys
    from test_store import fake_batch, start
    from vheads.store import Store

    with Store(sys.argv[1], read_only=sys.argv[2] == "read") as store:
        if sys.argv[2] == "write":  # a run between two batches: the first one is committed
            run = start(store)
            store.add_batch(run, *fake_batch([0, 1]))
            assert len(store.samples(run)) == 2  # the writer reads too, through a connection readers share
        print("holding", flush=True)
        sys.stdin.read()
"""


def test_a_store_is_read_between_the_batches_another_process_writes(tmp_path):
    """A writer holds the file only while it stores a batch: between two, other processes read what it committed
    (`vheads runs` during a `vheads run`), while a second writer is refused, naming the first."""
    path = tmp_path / "vheads.duckdb"
    Store(path).close()
    writer = run_python(HOLDER, str(path), "write")
    try:
        assert writer.stdout.readline().strip() == "holding"
        with Store(path, read_only=True) as store:
            assert store.run("r")["status"] == "running"
            assert list(store.samples("r")["sample_id"]) == ["s00000", "s00001"]
            assert len(store.head_stats("r")) == 2 * LAYERS * HEADS
        assert stored_counts(path)[1] == 2
        in_use = rf"store .*vheads.duckdb is in use by another process \(pid {writer.pid}\), which is writing it"
        with pytest.raises(StoreError, match=in_use):
            Store(path)
        with pytest.raises(StoreError, match=in_use):
            check_writable(path)
        with pytest.raises(StoreError, match=in_use):
            merge([write_shard(path, 1, 2, [5])], path)
        with pytest.raises(StoreError, match=rf"cannot merge .*vheads.duckdb: another process \(pid {writer.pid}\) "
                                             "is writing it"):
            merge([path], tmp_path / "main.duckdb")
        assert not (tmp_path / "main.duckdb").exists()
    finally:
        writer.communicate("")
    assert writer.returncode == 0
    with Store(path, read_only=True) as store:
        assert store.run("r")["status"] == "interrupted"
    assert not (tmp_path / "vheads.duckdb.lock").exists()


def test_a_reader_delays_a_writer_and_refuses_a_new_one(tmp_path, monkeypatch):
    """While another process reads the store, a run already writing waits to store its next batch, and opening it
    for writing is refused after `OPEN_WAIT_S`, naming the reader."""
    monkeypatch.setattr("vheads.store.schema.OPEN_WAIT_S", 0.3)
    path = tmp_path / "vheads.duckdb"
    with Store(path) as store:
        run = start(store)
        reader = run_python(HOLDER, str(path), "read")
        try:
            assert reader.stdout.readline().strip() == "holding"
            with pytest.raises(StoreError, match=rf"in use by another process \(pid {reader.pid}\)"):
                Store(tmp_path / "vheads.duckdb", read_only=False).close()
            threading.Timer(0.5, reader.communicate, [""]).start()
            began = time.monotonic()
            store.add_batch(run, *fake_batch([0, 1]))
            assert time.monotonic() - began >= 0.4
        finally:
            reader.wait()
        store.finish_run(run)
    assert stored_counts(path)[1] == 2


def test_paths_that_cannot_hold_a_store(tmp_path):
    missing = tmp_path / "no-such-folder" / "vheads.duckdb"
    with pytest.raises(StoreError, match="no-such-folder/vheads.duckdb: folder .* does not exist"):
        check_writable(missing)
    with pytest.raises(StoreError, match="no store at"):
        Store(tmp_path / "absent.duckdb", read_only=True)
    with pytest.raises(StoreError, match="is a folder"):
        Store(tmp_path)
    Store(tmp_path / "vheads.duckdb").close()
    with Store(tmp_path / "vheads.duckdb", read_only=True) as store, pytest.raises(StoreError, match="read-only"):
        start(store)


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write anywhere")
def test_a_read_only_folder_is_refused_before_any_work(tmp_path):
    folder = tmp_path / "locked"
    folder.mkdir()
    folder.chmod(0o500)
    try:
        with pytest.raises(StoreError, match="locked/vheads.duckdb: permission denied"):
            check_writable(folder / "vheads.duckdb")
    finally:
        folder.chmod(0o700)


def test_shard_files_sit_beside_the_store(tmp_path):
    assert shard_path(tmp_path / "vheads.duckdb", 2, 4) == tmp_path / "vheads.shard-2-of-4.duckdb"
    with pytest.raises(StoreError, match="bad shard 5/4"):
        shard_path("vheads.duckdb", 5, 4)


def write_shard(store_path: Path, k: int, n: int, indices: list[int], finish: str | None = "done") -> Path:
    path = shard_path(store_path, k, n)
    with Store(path) as store:
        run = start(store, "sharded", shard=(k, n))
        store.add_batch(run, *fake_batch(indices))
        if finish:
            store.finish_run(run, finish, skipped={"bad_image": 1})
    return path


def test_two_shards_merged_equal_one_run(tmp_path):
    main = tmp_path / "vheads.duckdb"
    with Store(tmp_path / "whole.duckdb") as whole:
        run = start(whole, "sharded")
        whole.add_batch(run, *fake_batch(list(range(10))))
        whole.finish_run(run)
        expected_samples = whole.samples(run).drop(columns="run_id")
        expected_heads = whole.head_stats(run).drop(columns="run_id")
    with Store(main) as store:
        start(store, "unrelated")
    shards = [write_shard(main, 1, 2, list(range(0, 10, 2))), write_shard(main, 2, 2, list(range(1, 10, 2)))]

    summary = merge(shards, main)
    assert summary.samples_added == 10 and summary.head_rows_added == 10 * LAYERS * HEADS
    assert summary.runs_created == ["sharded"] and summary.status == {"sharded": "done"}
    assert "10 samples" in str(summary)
    with Store(main, read_only=True) as store:
        info = store.run("sharded")
        assert info["run_id"] == 2 and info["status"] == "done" and info["n_samples"] == 10
        assert info["skipped"] == {"bad_image": 2}
        assert sorted(info["tags"]["parts"]) == ["1/2", "2/2"]
        assert store.samples("sharded").drop(columns="run_id").equals(expected_samples)
        assert store.head_stats("sharded").drop(columns="run_id").equals(expected_heads)

    again = merge(shards, main)
    assert again.samples_added == 0 and again.head_rows_added == 0 and again.status == {"sharded": "done"}
    with Store(main, read_only=True) as store:
        assert store.query("SELECT count(*) AS n FROM head_stats")["n"][0] == 10 * LAYERS * HEADS
        assert store.run("sharded")["skipped"] == {"bad_image": 2}


def test_a_merged_run_is_done_only_when_every_shard_is(tmp_path):
    main = tmp_path / "vheads.duckdb"
    first = write_shard(main, 1, 3, [0, 1])
    assert merge([first], main).status == {"sharded": "running"}
    second = write_shard(main, 2, 3, [2, 3], finish=None)
    assert merge([second], main).status == {"sharded": "interrupted"}
    third = write_shard(main, 3, 3, [4, 5])
    assert merge([third], main).status == {"sharded": "interrupted"}

    with Store(second) as store:
        run = start(store, "sharded", shard=(2, 3), resume=True)
        store.add_batch(run, *fake_batch([2, 3, 6]))
        store.finish_run(run)
    assert merge([second], main).status == {"sharded": "done"}
    with Store(main) as store:
        assert store.run("sharded")["n_samples"] == 7
        with pytest.raises(StoreError, match="assembled by merge"):
            start(store, "sharded", resume=True)


def test_merge_refuses_a_same_named_run_of_another_model(tmp_path):
    main = tmp_path / "vheads.duckdb"
    with Store(main) as store:
        start(store, "sharded", model="other-model")
    with pytest.raises(StoreError, match="cannot merge run sharded .*model 'other-model' != 'tiny-llava'"):
        merge([write_shard(main, 1, 2, [0])], main)
    with pytest.raises(StoreError, match="into itself"):
        merge([main], main)


def test_merge_refuses_same_named_runs_whose_configs_differ(tmp_path):
    main, other = tmp_path / "vheads.duckdb", tmp_path / "elsewhere.duckdb"
    with Store(main) as store:
        run = start(store, "demo-shapes-test", config={"batch_size": 4, "seed": 0, "limit": 300})
        store.add_batch(run, *fake_batch([0, 1]))
        store.finish_run(run)
    with Store(other) as store:
        run = start(store, "demo-shapes-test", config={"batch_size": 16, "seed": 1, "limit": 50})
        store.add_batch(run, *fake_batch([2, 3]))
        store.finish_run(run)
    with pytest.raises(StoreError, match="cannot merge run demo-shapes-test .*limit 300 != 50; seed 0 != 1"):
        merge([other], main, conflicts=differences)
    with Store(main, read_only=True) as store:
        assert store.run("demo-shapes-test")["n_samples"] == 2


def test_merge_folds_runs_that_differ_only_in_batch_size_device_or_shard(tmp_path):
    main = tmp_path / "vheads.duckdb"
    for k, batch in ((1, 4), (2, 16)):
        with Store(shard_path(main, k, 2)) as store:
            run = start(store, "sharded", shard=(k, 2),
                        config={"batch_size": batch, "device": f"cuda:{k}", "shard": [k, 2], "seed": 0})
            store.add_batch(run, *fake_batch([k]))
            store.finish_run(run)
    summary = merge([shard_path(main, 1, 2), shard_path(main, 2, 2)], main)
    assert summary.status == {"sharded": "done"} and summary.samples_added == 2


def test_export_writes_parquet(tmp_path):
    with Store(tmp_path / "vheads.duckdb") as store:
        for name in ("llava/pointqa", "llava/pope"):
            run = start(store, name)
            store.add_batch(run, *fake_batch([0, 1, 2]))
            store.finish_run(run)
        one = store.export("llava/pope", tmp_path / "out")
        everything = store.export(None, tmp_path / "all")
    assert [p.name for p in one] == [
        "llava_pope.runs.parquet",
        "llava_pope.samples.parquet",
        "llava_pope.head_stats.parquet",
        "llava_pope.comparisons.parquet",
        "llava_pope.groundings.parquet",
        "llava_pope.predictions.parquet",
        "llava_pope.accuracy_estimates.parquet",
    ]
    assert pq.read_table(one[0]).column("name").to_pylist() == ["llava/pope"]
    assert pq.read_table(one[2]).num_rows == 3 * LAYERS * HEADS
    assert set(pq.read_table(one[2]).column_names) >= {"sample_id", "layer", "head", *HEAD_FIELDS}
    assert [pq.read_table(p).num_rows for p in everything] == [2, 6, 6 * LAYERS * HEADS, 0, 0, 0, 0]


def later_schema(monkeypatch) -> None:
    """The store as a later vheads might shape it: a column added to groundings and a new table keyed by run."""
    from vheads.store import schema

    monkeypatch.setattr(schema, "_DDL", (*schema._DDL, "CREATE TABLE IF NOT EXISTS notes (run_id INTEGER NOT NULL, "
                                                       "sample_id TEXT, note JSON)"))
    monkeypatch.setattr(schema, "_ADDED_COLUMNS", (*schema._ADDED_COLUMNS, ("groundings", "added_later", "TEXT")))


def ground_and_note(store: Store, run: RunHandle) -> None:
    """A grounding, a note and a comparison of `run`, written as a command would (columns named, not positional)."""
    store.query("INSERT INTO groundings (run_id, selector, heads, sample_id, x1, y1, x2, y2, targets, pointing, iou, "
                "added_later) VALUES (?, 'top:2', '[\"0.1\"]', 's00000', 1, 2, 3, 4, '[[1, 2, 3, 4]]', true, 0.5, "
                "'from r')", [run.run_id])
    store.query("INSERT INTO notes VALUES (?, 's00001', '{\"seen\": true}')", [run.run_id])
    store.query("INSERT INTO comparisons VALUES (now(), ?, 'pair', 'heads', 'W', 'pearson', 0.5, 12, NULL)",
                [f'["{run.name}", "other"]'])


def test_merge_and_export_keep_every_table_and_column(tmp_path, monkeypatch):
    later_schema(monkeypatch)
    shard, main = tmp_path / "shard.duckdb", tmp_path / "vheads.duckdb"
    with Store(shard) as store:
        run = start(store)
        store.add_batch(run, *fake_batch([0, 1]))
        store.finish_run(run)
        ground_and_note(store, run)
    with Store(main) as store:
        start(store, "first")

    summary = merge([shard], main)
    assert summary.rows_added == {"samples": 2, "head_stats": 2 * LAYERS * HEADS, "groundings": 1, "notes": 1,
                                  "comparisons": 1, "predictions": 0, "accuracy_estimates": 0}
    assert "1 grounding rows" in str(summary)
    assert not any(merge([shard], main).rows_added.values())
    with Store(main, read_only=True) as store:
        grounded = store.query("SELECT run_id, sample_id, iou, added_later FROM groundings")
        assert grounded.to_dict("records") == [{"run_id": 2, "sample_id": "s00000", "iou": 0.5,
                                                "added_later": "from r"}]
        assert store.query("SELECT run_id, note FROM notes").to_dict("records") == [
            {"run_id": 2, "note": '{"seen": true}'}]
        one = store.export("r", tmp_path / "one")
        everything = store.export(None, tmp_path / "all")
    assert {p.name: pq.read_table(p).num_rows for p in one} == {
        "r.runs.parquet": 1, "r.samples.parquet": 2, "r.head_stats.parquet": 2 * LAYERS * HEADS,
        "r.comparisons.parquet": 1, "r.groundings.parquet": 1, "r.predictions.parquet": 0,
        "r.accuracy_estimates.parquet": 0, "r.notes.parquet": 1}
    assert {p.name: pq.read_table(p).num_rows for p in everything}["runs.parquet"] == 2
    assert pq.read_table(tmp_path / "one" / "r.groundings.parquet").column("added_later").to_pylist() == ["from r"]


def test_a_store_from_before_groundings_merges_and_exports(tmp_path):
    path = tmp_path / "old.duckdb"
    old_store(path)
    with Store(path, read_only=True) as store:
        assert [p.name for p in store.export(None, tmp_path / "out")] == [
            "runs.parquet", "samples.parquet", "head_stats.parquet", "comparisons.parquet"]
    summary = merge([path], tmp_path / "merged.duckdb")
    assert summary.samples_added == 2 and not summary.rows_added.get("groundings")


def test_a_failed_merge_leaves_no_new_file(tmp_path):
    import duckdb

    not_duckdb, not_vheads = tmp_path / "notes.duckdb", tmp_path / "other.duckdb"
    not_duckdb.write_text("hello")
    duckdb.connect(str(not_vheads)).close()
    for source in (not_duckdb, not_vheads):
        with pytest.raises(StoreError, match=source.name) as failure:
            merge([source], tmp_path / "new.duckdb")
        assert "\n" not in str(failure.value)
        assert not (tmp_path / "new.duckdb").exists() and not (tmp_path / "new.duckdb.wal").exists()


def test_a_failed_merge_leaves_an_existing_store_as_it_was(tmp_path):
    main = tmp_path / "old.duckdb"
    old_store(main)
    with Store(tmp_path / "other.duckdb") as other:
        start(other, model="another-model")
    with pytest.raises(StoreError, match="cannot merge run r .*model"):
        merge([tmp_path / "other.duckdb", write_shard(tmp_path / "x.duckdb", 1, 2, [0])], main)
    with Store(main, read_only=True) as store:
        assert store.query("SELECT count(*) AS n FROM duckdb_tables() WHERE table_name = 'groundings' "
                           "AND database_name = current_database()")["n"][0] == 0
        assert "pointing" not in store.head_stats("r").columns
        assert list(store.runs()["name"]) == ["r"]


def test_query_runs_sql_and_reports_errors_in_one_line(tmp_path):
    with Store(tmp_path / "vheads.duckdb") as store:
        run = start(store)
        store.add_batch(run, *fake_batch([0, 1]))
        frame = store.query("SELECT sample_id, correct FROM samples WHERE run_id = ? ORDER BY 1", [run.run_id])
        assert list(frame["sample_id"]) == ["s00000", "s00001"]
        with pytest.raises(StoreError, match="^query failed: .*no_such_table"):
            store.query("SELECT * FROM no_such_table")


def drop_since_digests(store: Store) -> None:
    """Take out of a store what vheads added from sample digests on: the digest, the answer's confidence and the
    prediction tables."""
    store.query("ALTER TABLE samples DROP COLUMN digest")
    for table in ("predictions", "accuracy_estimates"):
        store.query(f"DROP TABLE {table}")
    for column in ("first_token_prob", "mean_logprob"):
        store.query(f"ALTER TABLE samples DROP COLUMN {column}")


def old_store(path: Path) -> None:
    """A store as vheads wrote it before pointing, spatial entropy, groundings and prediction: one finished run."""
    with Store(path) as store:
        run = start(store)
        store.add_batch(run, *fake_batch([0, 1]))
        store.finish_run(run)
        store.query("DROP TABLE groundings")
        store.query("ALTER TABLE head_stats DROP COLUMN pointing")
        store.query("ALTER TABLE head_stats DROP COLUMN spatial_entropy")
        drop_since_digests(store)


def test_a_store_from_before_pointing_reads_and_gains_the_new_columns(tmp_path):
    from vheads.analysis.ranking import head_table

    path = tmp_path / "old.duckdb"
    old_store(path)
    with Store(path, read_only=True) as store:
        table = head_table(store, "r")
        assert table["pointing"].isna().all() and store.groundings("r").empty
    merge([path], tmp_path / "merged.duckdb")
    with Store(tmp_path / "merged.duckdb", read_only=True) as merged:
        assert merged.head_stats("r")["pointing"].isna().all() and len(merged.samples("r")) == 2
    with Store(path) as store:
        run = store.start_run("new", **{k: v for k, v in SETTINGS.items()})
        samples, *arrays = fake_batch([2])
        store.add_batch(run, samples, *arrays, pointing=np.ones_like(arrays[0]),
                        spatial_entropy=np.zeros_like(arrays[0]))
        stats = store.head_stats("new")
        assert (stats["pointing"] == 1.0).all() and (stats["spatial_entropy"] == 0.0).all()
        store.add_groundings("new", "top:2", ["0.1", "1.2"], [{"sample_id": "s00002", "x1": 1, "y1": 2, "x2": 3,
                                                              "y2": 4, "targets": [[1, 2, 3, 4]], "pointing": True,
                                                              "iou": 1.0}])
        store.add_groundings("new", "top:2", ["0.1", "1.2"], [{"sample_id": "s00002", "x1": None, "y1": None,
                                                              "x2": None, "y2": None, "targets": [],
                                                              "pointing": False, "iou": 0.0}])
        kept = store.groundings("new")
    assert len(kept) == 1 and kept["iou"].iloc[0] == 0.0 and kept["heads"].iloc[0] == ["0.1", "1.2"]


def test_a_store_from_before_grounding_sources_keeps_its_boxes_and_gains_the_key(tmp_path):
    path = tmp_path / "old.duckdb"
    with Store(path) as store:
        store.finish_run(start(store, "picked"))
        run = start(store)
        store.add_batch(run, *fake_batch([0, 1]))
        store.finish_run(run)
        store.query("DROP TABLE groundings")
        drop_since_digests(store)
        store.query("""CREATE TABLE groundings (run_id INTEGER NOT NULL, selector TEXT NOT NULL, heads JSON,
                       sample_id TEXT NOT NULL, x1 DOUBLE, y1 DOUBLE, x2 DOUBLE, y2 DOUBLE, targets JSON,
                       pointing BOOLEAN, iou DOUBLE, created TIMESTAMP, PRIMARY KEY (run_id, selector, sample_id))""")
        store.query("INSERT INTO groundings VALUES (2, 'top:2', '[\"0.1\"]', 's00000', 1, 2, 3, 4, '[[1, 2, 3, 4]]', "
                    "true, 1.0, now())")
    with Store(path, read_only=True) as store:
        assert list(store.groundings("r")["source"]) == [""]
    box = {"sample_id": "s00000", "x1": 0, "y1": 0, "x2": 2, "y2": 2, "targets": [], "pointing": None, "iou": None}
    with Store(path) as store:
        store.add_groundings("r", "top:2", ["1.1"], [box])
        store.add_groundings("r", "top:2", ["2.2"], [box], source="picked")
        kept = store.groundings("r").set_index("source")
        assert store.samples("r")["digest"].isna().all()
    assert sorted(kept.index) == ["", "picked", "r"], "one selector chosen on three runs: three head sets"
    assert kept.loc["", "iou"] == 1.0 and kept.loc["picked", "heads"] == ["2.2"] and pd.isna(kept.loc["r", "iou"])


def test_a_store_from_before_curves_keeps_its_curve_tags(tmp_path):
    """`runs.sweep` (the tag of an ablation curve's points) is `runs.curve` now: read-only opens and merges map the
    old name, and opening the store for writing renames the column."""
    path = tmp_path / "old.duckdb"
    with Store(path) as store:
        store.finish_run(start(store, "point", curve="curve-1"))
        store.query("ALTER TABLE runs RENAME COLUMN curve TO sweep")
    with Store(path, read_only=True) as store:
        assert list(store.runs()["curve"]) == ["curve-1"] and store.run("point")["curve"] == "curve-1"
    merge([path], tmp_path / "merged.duckdb")
    with Store(tmp_path / "merged.duckdb", read_only=True) as merged:
        assert merged.run("point")["curve"] == "curve-1"
    with Store(path) as store:
        assert list(store.query("SELECT curve FROM runs")["curve"]) == ["curve-1"]
