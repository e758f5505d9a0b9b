"""`vheads sweep` in-process: the plan, study files, the driver writing what workers compute, failures reported."""

from __future__ import annotations

import json
import shutil
import sys

import pandas as pd
import pytest
from typer.testing import CliRunner

from vheads.cli import app
from vheads.cli.sweep import option_spellings, run_config
from vheads.data import write_shapes
from vheads.pipeline.config import RunConfig
from vheads.pipeline.run import Interrupted, run
from vheads.store import Store
from vheads.sweep.driver import SweepError, absolute, plan, run_sweep
from vheads.sweep.study import expand, read_study


@pytest.fixture(scope="module")
def two_models(model_dirs, tmp_path_factory):
    """The tiny LLaVA under two folder names, standing for two models."""
    root = tmp_path_factory.mktemp("models")
    return [str(shutil.copytree(model_dirs("llava"), root / name)) for name in ("tiny-a", "tiny-b")]


def figures(store, name):
    """A run's samples and head figures, in a fixed order, for comparing two stores."""
    with Store(store, read_only=True) as db:
        samples = db.samples(name).drop(columns=["run_id"]).sort_values("sample_id").reset_index(drop=True)
        heads = db.head_stats(name).drop(columns=["run_id"])
    return samples, heads.sort_values(["sample_id", "layer", "head"]).reset_index(drop=True)


def test_plan_names_every_run_and_makes_its_paths_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models" / "llava-7b").mkdir(parents=True)
    configs = [RunConfig(model=m, dataset="pope", data="pope.jsonl", images="coco", readout=r)
               for m in ("models/llava-7b", "llava-hf/llava-1.5-7b-hf") for r in ("prompt", "generated")]
    configs.append(RunConfig(dataset="shapes", prompt_style="plain", ablate=[(0, 1)], tags={"ablate": "top:5"}))
    runs = plan(configs)
    assert [r.name for r in runs] == ["llava-7b-pope", "llava-7b-pope-generated", "llava-1.5-7b-hf-pope",
                                      "llava-1.5-7b-hf-pope-generated", "demo-shapes-plain-zero-top_5"]
    assert runs[0].model == str(tmp_path / "models" / "llava-7b") and runs[2].model == "llava-hf/llava-1.5-7b-hf"
    assert runs[0].data == str(tmp_path / "pope.jsonl") and runs[0].images == str(tmp_path / "coco")
    assert all(r.resume and r.shard is None for r in runs)
    assert absolute(RunConfig(model="demo")).model == "demo"


def test_plan_refuses_runs_that_would_share_a_name():
    with pytest.raises(ValueError, match="both be run 'llava-shapes'"):
        plan([RunConfig(model="/a/llava"), RunConfig(model="/b/llava")])


def test_plan_applies_the_preset_and_checks_the_values_as_vheads_run_does():
    paper = plan([RunConfig(preset="paper"), RunConfig(preset="paper", readout="prompt", explicit=("readout",))])
    assert [(r.name, r.readout, r.max_new_tokens) for r in paper] == [
        ("demo-shapes-first-generated", "first-generated", 128), ("demo-shapes", "prompt", 128)]
    with pytest.raises(ValueError, match="--limit 0: must be at least 1"):
        plan([RunConfig(limit=0)])


def test_a_study_file_is_every_combination_of_its_axes(tmp_path):
    study = tmp_path / "study.toml"
    study.write_text('store = "out/s.duckdb"\nshards = 2\nlimit = 4\nmax-new-tokens = 3\n'
                     'models = ["demo", { model = "m", dtype = "float32" }]\n'
                     'datasets = ["shapes", "pope:pope.jsonl"]\n'
                     'readouts = ["prompt", "generated"]\n'
                     'ablations = ["none", { ablate = "0.1", ablation = "uniform" }]\n')
    read = read_study(study, option_spellings())
    assert read.settings == {"shards": 2}
    assert read.base == {"store": str(tmp_path / "out" / "s.duckdb"), "limit": 4, "max_new_tokens": 3}
    assert read.axes["datasets"] == [{"dataset": "shapes"}, {"dataset": "pope", "data": str(tmp_path / "pope.jsonl")}]
    combos = expand(read.base, read.axes)
    assert len(combos) == 16
    assert combos[-1] == {**read.base, "model": "m", "dtype": "float32", "dataset": "pope",
                          "data": str(tmp_path / "pope.jsonl"), "readout": "generated", "ablate_heads": "0.1",
                          "ablation": "uniform"}
    study.write_text('models = ["demo"]\nbatchsize = 3\n')
    with pytest.raises(ValueError, match=r"study.toml: top level: unknown option 'batchsize'"):
        read_study(study, option_spellings())


def test_an_in_process_sweep_stores_what_vheads_run_stores_and_reports_the_failed_run(tmp_path, two_models):
    store = tmp_path / "vheads.duckdb"
    configs = [RunConfig(model=m, limit=6, batch_size=2) for m in two_models + [str(tmp_path / "no-such")]]
    result = run_sweep(plan(configs), store, shards=2, local=True, retries=3)
    tasks = result.tasks
    assert list(tasks["status"]) == ["done"] * 4 + ["failed"] * 2 and not result.ok
    assert list(tasks["samples"][:4]) == [3, 3, 3, 3]
    assert tasks["error"][4].startswith("ModelError: model path") and "does not exist" in tasks["error"][4]
    with Store(store, read_only=True) as db:
        runs = db.runs().set_index("name")
        assert set(runs.index) == {"tiny-a-shapes", "tiny-b-shapes"}
        assert (runs["status"] == "done").all() and (runs["n_samples"] == 6).all()

    reference = tmp_path / "run.duckdb"
    run(RunConfig(model=two_models[0], limit=6, batch_size=2, store=str(reference), name="tiny-a-shapes"))
    for ours, theirs in zip(figures(store, "tiny-a-shapes"), figures(reference, "tiny-a-shapes"), strict=True):
        pd.testing.assert_frame_equal(ours, theirs, check_exact=False, rtol=1e-4, atol=1e-6)  # other batches
    with Store(store, read_only=True) as db, Store(reference, read_only=True) as ref:
        assert db.run("tiny-a-shapes")["config"] == ref.run("tiny-a-shapes")["config"]
        assert db.run("tiny-a-shapes")["accuracy"] == ref.run("tiny-a-shapes")["accuracy"]

    again = run_sweep(plan(configs[:2]), store, shards=2, local=True)
    assert again.ok and list(again.tasks["shard"]) == ["kept", "kept"]


def interrupted_run(config: RunConfig, batches: int) -> None:
    """`config` run until `batches` batches are computed, then stopped as by Ctrl-C."""
    def stop(done, total, correct, scored):
        if done >= batches * config.batch_size:
            raise KeyboardInterrupt

    with pytest.raises(Interrupted):
        run(config, progress=stop)


def test_a_sweep_resumes_a_run_and_a_run_that_cannot_resume_fails_alone(tmp_path, two_models):
    store = tmp_path / "vheads.duckdb"
    interrupted_run(RunConfig(model=two_models[0], limit=5, batch_size=2, store=str(store), name="tiny-a-shapes"), 1)
    run(RunConfig(model=two_models[1], limit=2, readout="generated", store=str(store), name="tiny-b-shapes"))
    tasks = run_sweep(plan([RunConfig(model=m, limit=5) for m in two_models]), store, shards=2, local=True).tasks
    assert list(tasks["status"]) == ["done", "done", "failed", "failed"]
    assert list(tasks["samples"][:2]) == [1, 2]
    assert "cannot resume run tiny-b-shapes" in tasks["error"][2] and "readout" in tasks["error"][2]
    with Store(store, read_only=True) as db:
        assert db.run("tiny-a-shapes")["status"] == "done" and len(db.samples("tiny-a-shapes")) == 5


@pytest.mark.parametrize("change, words", [
    ({"seed": 5}, "--seed 5 (the run has 0)"),
    ({"max_new_tokens": 1}, "--max-new-tokens 1 (the run has 2)"),
    ({"limit": 5}, "--limit 5 (the run has 3)"),
    ({"max_pixels": 50_000}, "--max-pixels 50000 (the run has 50000000)"),
])
def test_a_sweep_run_again_with_other_settings_is_refused_and_keeps_the_run(tmp_path, two_models, change, words):
    store = tmp_path / "vheads.duckdb"
    settings = {"model": two_models[0], "limit": 3, "max_new_tokens": 2}
    assert run_sweep(plan([RunConfig(**settings)]), store, local=True).ok
    with Store(store, read_only=True) as db:
        before = db.run("tiny-a-shapes")
    again = run_sweep(plan([RunConfig(**{**settings, **change})]), store, local=True)
    row = again.tasks.iloc[0]
    assert row["status"] == "failed" and row["samples"] == 0
    assert row["error"].startswith("cannot resume run tiny-a-shapes: ") and words in row["error"]
    with Store(store, read_only=True) as db:
        after = db.run("tiny-a-shapes")
    assert after["n_samples"] == 3 and after["config"] == before["config"] and after["status"] == "done"
    same = run_sweep(plan([RunConfig(**settings, batch_size=2)]), store, local=True)
    assert same.ok and list(same.tasks["shard"]) == ["kept"]


def test_a_sweep_checks_each_run_against_its_model_as_vheads_run_does(tmp_path, two_models):
    configs = [RunConfig(model=two_models[0], limit=2, stages=(1, 50)), RunConfig(model=two_models[1], limit=2)]
    result = run_sweep(plan(configs), tmp_path / "s.duckdb", local=True, retries=2)
    first, second = result.tasks.itertuples()
    assert first.status == "failed" and first.error.startswith("ValueError: --stages 1,50: need 0 < A < B <")
    assert second.status == "done"
    with Store(tmp_path / "s.duckdb", read_only=True) as db:
        assert list(db.runs()["name"]) == ["tiny-b-shapes"]


def test_each_shard_reports_its_own_accuracy_and_progress_counts_the_whole_run(tmp_path):
    data = write_shapes(tmp_path / "data", n=4, seed=1)
    records = json.loads(data.read_text())
    for record in records[2:]:
        record["answer"] = "9"  # the demo model never counts nine: the second shard scores 0
    data.write_text(json.dumps(records))
    events = []
    result = run_sweep(plan([RunConfig(dataset="pointqa", data=str(data), batch_size=1)]), tmp_path / "s.duckdb",
                       shards=2, local=True, on_event=events.append)
    assert result.ok
    with Store(tmp_path / "s.duckdb", read_only=True) as db:
        samples = db.samples("demo-pointqa").set_index("sample_id")["correct"]
    ids = [record["id"] for record in records]
    assert list(result.tasks["accuracy"]) == [samples[ids[:2]].mean(), samples[ids[2:]].mean()] == [1.0, 0.0]
    assert {event.total for event in events if event.kind in ("open", "progress")} == {4}


def test_the_sweep_command_with_a_study_file_and_run_options(tmp_path, two_models, monkeypatch):
    monkeypatch.chdir(tmp_path)
    study = tmp_path / "study.toml"
    study.write_text(f'store = "s.duckdb"\nlimit = 3\nbatch-size = 2\nmodels = ["{two_models[0]}"]\n'
                     'readouts = ["prompt", "first-generated"]\n'
                     'ablations = ["none", { ablate = "0.1", ablation = "uniform" }]\n')
    result = CliRunner().invoke(app, ["sweep", str(study), "--no-ray", "--max-new-tokens", "2", "--shards", "2"])
    assert result.exit_code == 0, result.output
    with Store(tmp_path / "s.duckdb", read_only=True) as db:
        runs = db.runs().set_index("name")
    assert set(runs.index) == {"tiny-a-shapes", "tiny-a-shapes-first-generated", "tiny-a-shapes-uniform-0.1",
                               "tiny-a-shapes-first-generated-uniform-0.1"}
    assert (runs["n_samples"] == 3).all() and runs.loc["tiny-a-shapes-uniform-0.1", "ablation"] == "uniform:0.1"
    assert {c["max_new_tokens"] for c in runs["config"]} == {2}

    bad = CliRunner().invoke(app, ["sweep", "--models", "/a/m,/b/m", "--no-ray"])
    assert bad.exit_code == 2 and "both be run" in bad.output
    failed = CliRunner().invoke(app, ["sweep", "--models", "missing-folder/", "--no-ray", "--store", "f.duckdb"])
    assert failed.exit_code == 1 and "failed missing-folder-shapes 1/1: ModelError" in failed.output


def test_without_ray_the_sweep_says_what_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)
    with pytest.raises(SweepError, match=r"install vheads\[ray\]"):
        run_sweep(plan([RunConfig()]), tmp_path / "v.duckdb")


def test_string_entries_of_the_ablations_axis_name_heads_selectors_or_none(tmp_path, two_models):
    study = tmp_path / "study.toml"
    study.write_text(f'models = ["{two_models[0]}"]\nablate = "0.1"\n'
                     'ablations = ["none", "0.1,0.2,2.3", "random:2:1"]\n')
    read = read_study(study, option_spellings())
    assert read.axes["ablations"] == [{"ablate_heads": None}, {"ablate_heads": "0.1,0.2,2.3"},
                                      {"ablate_heads": "random:2:1"}]
    runs = plan([run_config(combo, str(tmp_path / "s.duckdb")) for combo in expand(read.base, read.axes)])
    assert [r.name for r in runs] == ["tiny-a-shapes", "tiny-a-shapes-zero-0.1+0.2+2.3",
                                      "tiny-a-shapes-zero-random_2_1"]
    assert runs[0].ablate == [] and runs[1].ablate == [(0, 1), (0, 2), (2, 3)] and len(runs[2].ablate) == 2


@pytest.mark.parametrize("line, words", [
    ('limit = "forty"', ("limit", "'forty'", "an integer")),
    ("seed = 1.5", ("seed", "an integer")),
    ("trust-remote-code = 1", ("trust-remote-code", "true or false")),
    ('readout = 3', ("readout", "a string")),
    ("batch-size = 0", ("batch-size 0", "at least 1")),
    ('shards = "two"', ("shards", "an integer")),
    ('datasets = [{ dataset = "shapes", limit = true }]', ("datasets entry", "limit", "an integer")),
])
def test_study_values_of_the_wrong_type_are_one_line_naming_the_file_and_key(tmp_path, line, words):
    study = tmp_path / "study.toml"
    study.write_text(f'models = ["demo"]\n{line}\n')
    result = CliRunner().invoke(app, ["sweep", str(study), "--no-ray", "--store", str(tmp_path / "s.duckdb")])
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"error: study file {study}: "), result.output
    assert all(word in lines[0] for word in words), lines[0]


def test_options_given_to_a_paper_preset_sweep_win_whatever_their_value(tmp_path, two_models):
    store = tmp_path / "s.duckdb"
    flags = CliRunner().invoke(app, ["sweep", "--models", two_models[0], "--no-ray", "--store", str(store),
                                     "--preset", "paper", "--readout", "prompt", "--limit", "1",
                                     "--max-new-tokens", "8"])
    assert flags.exit_code == 0, flags.output
    study = tmp_path / "study.toml"
    study.write_text(f'store = "axis.duckdb"\npreset = "paper"\nlimit = 1\nmax-new-tokens = 2\n'
                     f'models = ["{two_models[0]}"]\nreadouts = ["prompt", "generated"]\n')
    axis = CliRunner().invoke(app, ["sweep", str(study), "--no-ray"])
    assert axis.exit_code == 0, axis.output
    with Store(store, read_only=True) as db:
        run = db.run("tiny-a-shapes")
    assert run["readout"] == "prompt" and run["config"]["max_new_tokens"] == 8 and run["config"]["preset"] == "paper"
    with Store(tmp_path / "axis.duckdb", read_only=True) as db:
        runs = db.runs().set_index("name")
    assert set(runs.index) == {"tiny-a-shapes", "tiny-a-shapes-generated"}
    assert list(runs["readout"]) == ["prompt", "generated"]
    assert {c["max_new_tokens"] for c in runs["config"]} == {2}
