"""`vheads run` end to end: stored rows, resume after a real kill, shards, clean interrupts, clear errors."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from vheads.cli import app
from vheads.data import Dataset, load_dataset
from vheads.heads import parse_heads
from vheads.models import load
from vheads.pipeline.config import RunConfig, parse_shard, shard_samples
from vheads.pipeline.run import Interrupted, run
from vheads.store import Store, merge

VHEADS = [sys.executable, "-m", "vheads"]


@pytest.fixture(scope="module")
def llava(model_dirs):
    return load(model_dirs("llava"))


def test_a_run_stores_every_sample_and_head(tmp_path, llava):
    config = RunConfig(model=str(llava.name), limit=10, batch_size=4, store=str(tmp_path / "s.duckdb"), name="r")
    summary = run(config, loaded=llava)
    assert summary.samples == 10 and summary.status == "done"
    assert set(summary.by_type) == {"general", "obj", "super"}
    with Store(tmp_path / "s.duckdb", read_only=True) as store:
        info = store.run("r")
        assert info["status"] == "done" and info["family"] == "llava" and info["split"] == "test"
        samples = store.samples("r")
        assert len(samples) == 10 and samples["sample_id"].is_unique
        assert (samples["image_tokens"] == 16).all() and (samples["region_tokens"] > 0).all()
        stats = store.head_stats("r")
        assert len(stats) == 10 * 3 * 4
        assert stats["visual_weight"].between(0, 1).all()


def test_ablated_runs_change_answers_and_record_their_heads(tmp_path, llava):
    store = str(tmp_path / "s.duckdb")
    run(RunConfig(limit=6, store=store, name="clean"), loaded=llava)
    heads = [(layer, head) for layer in range(3) for head in range(4)]
    run(RunConfig(limit=6, store=store, name="all-off", ablate=heads), loaded=llava)
    with Store(store, read_only=True) as db:
        assert db.run("all-off")["ablation"].startswith("zero:0.0,0.1")
        clean, off = db.samples("clean"), db.samples("all-off")
        assert list(clean["prediction"]) != list(off["prediction"])


def test_shards_merged_equal_one_run(tmp_path, llava):
    dataset = load_dataset("shapes", limit=9)
    whole = tmp_path / "whole.duckdb"
    run(RunConfig(store=str(whole), name="r", batch_size=3), loaded=llava, dataset=dataset)
    store = tmp_path / "vheads.duckdb"
    for k in (1, 2):
        run(RunConfig(store=str(store), name="r", shard=(k, 2), batch_size=3), loaded=llava, dataset=dataset)
    shards = sorted(tmp_path.glob("vheads.shard-*.duckdb"))
    assert len(shards) == 2
    merge(shards, store)
    merge(shards, store)
    with Store(whole, read_only=True) as a, Store(store, read_only=True) as b:
        assert b.run("r")["status"] == "done"
        sa, sb = a.samples("r").sort_values("sample_id"), b.samples("r").sort_values("sample_id")
        assert list(sa["sample_id"]) == list(sb["sample_id"]) and list(sa["prediction"]) == list(sb["prediction"])
        ha = a.head_stats("r").sort_values(["sample_id", "layer", "head"])
        hb = b.head_stats("r").sort_values(["sample_id", "layer", "head"])
        assert len(ha) == len(hb) == 9 * 12
        np.testing.assert_allclose(ha["visual_weight"], hb["visual_weight"], atol=1e-5)


def _start(args: list[str], cwd: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(VHEADS + args, cwd=cwd, stderr=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                            env=env)


def _wait_for_batches(proc: subprocess.Popen, n: int, timeout: float = 180) -> None:
    seen = 0
    deadline = time.time() + timeout
    while time.time() < deadline:
        line = proc.stderr.readline()
        if not line:
            break
        if "stored " in line:
            seen += 1
            if seen >= n:
                return
    raise AssertionError(f"the run did not store {n} batches in time")


def test_resume_after_a_real_kill_leaves_no_duplicate_and_no_gap(tmp_path, model_dirs, monkeypatch):
    args = ["run", "--model", str(model_dirs("llava")), "--limit", "24", "--batch-size", "2", "--name", "k",
            "--store", "s.duckdb", "-v"]
    proc = _start(args, tmp_path)
    _wait_for_batches(proc, 2)
    proc.send_signal(signal.SIGKILL)
    proc.wait(30)
    with Store(tmp_path / "s.duckdb", read_only=True) as store:
        partial = store.samples("k")
        assert 4 <= len(partial) < 24
    # The kill was of a real process; the resume runs in this one (a second process would only add its start-up),
    # without -v (the info lines the test read from the killed run's stderr).
    monkeypatch.chdir(tmp_path)
    done = runner.invoke(app, [a for a in args if a != "-v"] + ["--resume"])
    assert done.exit_code == 0, done.output
    with Store(tmp_path / "s.duckdb", read_only=True) as store:
        assert store.run("k")["status"] == "done"
        samples = store.samples("k")
        assert len(samples) == 24 and samples["sample_id"].is_unique
        stats = store.head_stats("k")
        assert len(stats) == 24 * 12
        assert not stats.duplicated(["sample_id", "layer", "head"]).any()


def test_sigterm_marks_the_run_interrupted_and_exits_130(tmp_path, model_dirs):
    args = ["run", "--model", str(model_dirs("llava")), "--limit", "40", "--batch-size", "2", "--name", "t",
            "--store", "s.duckdb", "-v"]
    proc = _start(args, tmp_path)
    _wait_for_batches(proc, 1)
    proc.send_signal(signal.SIGTERM)
    _, rest = proc.communicate(timeout=60)
    assert proc.returncode == 130
    assert "--resume" in rest
    with Store(tmp_path / "s.duckdb", read_only=True) as store:
        assert store.run("t")["status"] == "interrupted"
        assert len(store.samples("t")) >= 2


runner = CliRunner()


def test_cli_run_then_runs_heads_query_export(tmp_path, model_dirs):
    store = str(tmp_path / "s.duckdb")
    result = runner.invoke(app, ["run", "--model", str(model_dirs("llava")), "--limit", "6", "--store", store,
                                 "--name", "cli"])
    assert result.exit_code == 0, result.output
    assert "accuracy" in result.output and "top-10 heads" in result.output
    listed = runner.invoke(app, ["runs", "--store", store, "--format", "csv"])
    assert "cli" in listed.output and "done" in listed.output
    heads = runner.invoke(app, ["heads", "--run", "cli", "--store", store, "--format", "json", "--top", "0"])
    import json

    rows = json.loads(heads.output)
    assert len(rows) == 12 and rows[0]["rank"] == 1 and {"score", "mean_w", "mean_c", "stage"} <= set(rows[0])
    queried = runner.invoke(app, ["query", "SELECT count(*) AS n FROM head_stats", "--store", store, "--csv"])
    assert queried.output.strip().splitlines()[-1] == "72"
    exported = runner.invoke(app, ["export", "--run", "cli", "--out", str(tmp_path / "pq"), "--store", store])
    assert exported.exit_code == 0 and list((tmp_path / "pq").rglob("*.parquet"))


@pytest.mark.parametrize("args,message", [
    (["run", "--dataset", "nope"], "unknown dataset 'nope'; known:"),
    (["run", "--dataset", "pope", "--data", "missing.jsonl"], "missing.jsonl"),
    (["run", "--model", "./no/such/model"], "does not exist"),
    (["run", "--ablate", "3-1"], "is not LAYER.HEAD"),
    (["run", "--readout", "last"], "unknown --readout"),
    (["run", "--shard", "5/4"], "--shard"),
    (["run", "--store", "/no/such/folder/s.duckdb"], "/no/such/folder"),
    (["heads", "--store", "absent.duckdb"], "does not exist"),
])
def test_bad_options_are_one_clear_line_and_exit_2(tmp_path, args, message, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(app, args)
    assert result.exit_code == 2
    assert message in result.output
    assert "Traceback" not in result.output


def test_unknown_run_names_list_the_known_ones(tmp_path, llava):
    store = str(tmp_path / "s.duckdb")
    run(RunConfig(limit=2, store=store, name="known-run"), loaded=llava)
    result = runner.invoke(app, ["heads", "--run", "nope", "--store", store])
    assert result.exit_code == 2 and "known-run" in result.output


def test_parsers_and_sharding():
    assert parse_heads("3.1, 4.7") == [(3, 1), (4, 7)]
    assert parse_shard("2/4") == (2, 4)
    items = list(range(10))
    assert [shard_samples(items, (k, 3)) for k in (1, 2, 3)] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]


def test_progress_counts_the_whole_run_and_scores_only_the_scored_samples(tmp_path):
    samples = load_dataset("shapes", limit=6).samples
    unscored = [replace(s, answer=None) if i % 2 else s for i, s in enumerate(samples)]
    dataset = Dataset("shapes", unscored, split="test")
    config = RunConfig(limit=6, batch_size=2, store=str(tmp_path / "s.duckdb"), name="half")
    calls = []

    def stop_after_two(done, total, correct, scored):
        calls.append((done, total, correct, scored))
        if done == 2:
            raise KeyboardInterrupt

    with pytest.raises(Interrupted):
        run(config, dataset=dataset, progress=stop_after_two)
    summary = run(replace(config, resume=True), dataset=dataset,
                  progress=lambda *args: calls.append(args), start=lambda *args: calls.append(("start", *args)))
    assert calls[1] == ("start", 2, 6)
    assert [(done, total) for done, total, *_ in calls[2:]] == [(4, 6), (6, 6)]
    done, total, correct, scored = calls[-1]
    assert scored == 3 and correct / scored == summary.accuracy == 1.0


def test_a_benchmark_reports_the_run_metrics_its_loader_names(tmp_path, llava):
    """POPE's loader names its F1 figures; the run computes them without knowing which benchmark it ran."""
    from test_data_formats import write_pope

    from vheads.data.scoring import pope_metrics

    data = write_pope(tmp_path)
    assert load_dataset("pope", data=data, images=tmp_path / "val2014").metrics == ("pope",)
    assert load_dataset("shapes", limit=2).metrics == ()
    store = str(tmp_path / "s.duckdb")
    summary = run(RunConfig(dataset="pope", data=str(data), images=str(tmp_path / "val2014"), store=store, name="p"),
                  loaded=llava)
    with Store(store, read_only=True) as db:
        answered = db.samples("p").sort_values("sample_id")
    assert summary.extra == {"pope": pope_metrics(list(answered["prediction"]), list(answered["answer"]))}
    shapes = run(RunConfig(limit=2, store=store, name="s"), loaded=llava)
    assert shapes.extra == {}


def test_no_module_outside_data_names_a_benchmark_metric():
    """A loader owns its metrics (as an lm-eval task owns its metric list): the run path reads `Dataset.metrics`."""
    import vheads

    root = Path(vheads.__file__).parent
    outside = [path for path in root.rglob("*.py") if root / "data" not in path.parents]
    leaks = [str(path.relative_to(root)) for path in outside if re.search(r"pope_metrics|yesno", path.read_text())]
    assert leaks == []
