"""`vheads sweep`: the plan, in-process and Ray sweeps merged into one store, failures reported, re-runs idempotent."""

from __future__ import annotations

import shutil
import sys

import pytest
from typer.testing import CliRunner

from vheads.cli import app
from vheads.pipeline import RunConfig, run
from vheads.store import Store
from vheads.sweep import SweepError, parse_dataset, plan, run_sweep


@pytest.fixture(scope="module")
def two_models(model_dirs, tmp_path_factory):
    """The tiny LLaVA under two folder names, standing for two models."""
    root = tmp_path_factory.mktemp("models")
    return [str(shutil.copytree(model_dirs("llava"), root / name)) for name in ("tiny-a", "tiny-b")]


def test_plan_gives_one_resumable_task_per_model_dataset_and_shard(tmp_path):
    base = RunConfig(store=str(tmp_path / "vheads.duckdb"), limit=6, readout="generated")
    configs = plan(["/models/llava-7b", "demo"], ["shapes", "pope:/data/pope.jsonl"], 2, base)
    assert [(c.name, c.shard) for c in configs[:4]] == [
        ("llava-7b-shapes-generated", (1, 2)), ("llava-7b-shapes-generated", (2, 2)),
        ("llava-7b-pope-generated", (1, 2)), ("llava-7b-pope-generated", (2, 2)),
    ]
    assert {c.name for c in configs[4:]} == {"demo-shapes-generated", "demo-pope-generated"}
    assert all(c.resume and c.limit == 6 for c in configs)
    assert [c.data for c in configs[:4]] == [None, None, "/data/pope.jsonl", "/data/pope.jsonl"]
    files = [c.store_path() for c in configs]
    assert len(set(files)) == len(files)
    assert files[0] == tmp_path / "vheads-sweep" / "llava-7b-shapes-generated.shard-1-of-2.duckdb"


def test_plan_with_one_shard_and_a_workdir(tmp_path):
    configs = plan(["demo"], ["shapes"], 1, RunConfig(store="out/v.duckdb", split="train"), workdir=tmp_path)
    assert [(c.name, c.shard) for c in configs] == [("demo-shapes-train", None)]
    assert configs[0].store_path() == tmp_path / "v-sweep" / "demo-shapes-train.duckdb"


def test_plan_refuses_runs_that_would_share_a_name():
    with pytest.raises(ValueError, match="both be run 'llava-shapes'"):
        plan(["/a/llava", "/b/llava"], ["shapes"], 2, RunConfig())
    assert parse_dataset("POPE:/d/x:y.jsonl") == ("pope", "/d/x:y.jsonl")


def test_an_in_process_sweep_merges_every_run_and_reports_the_failed_task(tmp_path, two_models):
    store = tmp_path / "vheads.duckdb"
    models = two_models + [str(tmp_path / "no-such-model")]
    configs = plan(models, ["shapes"], 2, RunConfig(limit=6, batch_size=3, store=str(store)))
    result = run_sweep(configs, into=store, local=True)
    tasks = result.tasks
    assert list(tasks["status"]) == ["done"] * 4 + ["failed"] * 2 and not result.ok
    assert list(tasks["samples"][:4]) == [3, 3, 3, 3]
    assert tasks["error"][4].startswith("ModelError: model path") and "does not exist" in tasks["error"][4]
    with Store(store, read_only=True) as db:
        runs = db.runs().set_index("name")
        assert set(runs.index) == {"tiny-a-shapes", "tiny-b-shapes"}
        assert (runs["status"] == "done").all() and (runs["n_samples"] == 6).all()
        assert len(db.head_stats("tiny-a-shapes")) == 6 * 3 * 4

    again = run_sweep(configs[:4], into=store, local=True)
    assert again.ok and list(again.tasks["seconds"]) == [0.0] * 4
    assert sum(m.samples_added for m in again.merges) == 0
    with Store(store, read_only=True) as db:
        assert len(db.samples("tiny-b-shapes")) == 6


def test_a_run_that_cannot_merge_is_reported_and_the_others_land(tmp_path, two_models):
    store = tmp_path / "vheads.duckdb"
    run(RunConfig(model=two_models[0], limit=2, store=str(store), name="tiny-a-shapes"))
    configs = plan(two_models, ["shapes"], 2, RunConfig(limit=2, store=str(store)))
    tasks = run_sweep(configs, into=store, local=True).tasks
    assert list(tasks["status"]) == ["merge failed"] * 2 + ["done"] * 2
    assert "cut into 2 shard(s) there but 1" in tasks["error"][0]
    with Store(store, read_only=True) as db:
        assert db.run("tiny-b-shapes")["status"] == "done" and db.run("tiny-a-shapes")["n_samples"] == 2


def test_the_sweep_command_in_process(tmp_path, two_models):
    store = tmp_path / "s.duckdb"
    args = ["sweep", "--models", ",".join(two_models), "--datasets", "shapes", "--shards", "2", "--limit", "4",
            "--store", str(store), "--workdir", str(tmp_path / "work"), "--no-ray"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "tiny-b-shapes (done)" in result.output
    assert sorted(p.name for p in (tmp_path / "work" / "s-sweep").iterdir()) == [
        f"tiny-{m}-shapes.shard-{k}-of-2.duckdb" for m in "ab" for k in (1, 2)]
    bad = CliRunner().invoke(app, ["sweep", "--models", "/a/m,/b/m", "--store", str(store), "--no-ray"])
    assert bad.exit_code == 2 and "both be run" in bad.output


def test_without_ray_the_sweep_says_what_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)
    configs = plan(["demo"], ["shapes"], 1, RunConfig(store=str(tmp_path / "v.duckdb")))
    with pytest.raises(SweepError, match=r"install vheads\[ray\]"):
        run_sweep(configs, into=tmp_path / "v.duckdb")


def test_a_sweep_on_local_ray_with_a_failing_task(tmp_path, two_models):
    pytest.importorskip("ray")
    store = tmp_path / "vheads.duckdb"
    models = [two_models[0], str(tmp_path / "no-such-model")]
    configs = plan(models, ["shapes"], 2, RunConfig(limit=4, batch_size=2, store=str(store)))
    tasks = run_sweep(configs, into=store, num_cpus=2).tasks
    assert list(tasks["status"]) == ["done", "done", "failed", "failed"], tasks.to_string()
    assert "does not exist" in tasks["error"][3]
    with Store(store, read_only=True) as db:
        run = db.run("tiny-a-shapes")
        assert run["status"] == "done" and run["n_samples"] == 4
        assert set(run["tags"]["parts"]) == {"1/2", "2/2"}
