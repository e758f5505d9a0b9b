"""A run's stored settings: reused by --resume and `ablate --from`, kept apart by default names and merge,
checked for range, with stage boundaries, the paper preset and absolute data paths."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from vheads.analysis.compare import compare_runs
from vheads.analysis.ranking import head_table
from vheads.cli import app
from vheads.data import write_shapes
from vheads.models import load
from vheads.pipeline.config import RunConfig
from vheads.pipeline.run import run
from vheads.store import Store

runner = CliRunner()
README_SQL = (Path(__file__).parents[1] / "docs" / "measures.md").read_text().split("```sql\n")[1].split("```")[0]


@pytest.fixture(scope="module")
def llava(model_dirs):
    return load(model_dirs("llava"))


@pytest.fixture(scope="module")
def source(tmp_path_factory, llava):
    """A 4-question plain-style run with seed 3 and its own question file: what the points must reuse."""
    folder = tmp_path_factory.mktemp("source")
    data = write_shapes(folder / "data", n=12, seed=5)
    store = str(folder / "s.duckdb")
    result = runner.invoke(app, ["run", "--model", llava.name, "--dataset", "pointqa", "--data", str(data),
                                 "--prompt-style", "plain", "--limit", "4", "--seed", "3", "--max-new-tokens", "2",
                                 "--store", store, "--name", "src"])
    assert result.exit_code == 0, result.output
    return store, str(data)


def config_of(store: str, name: str) -> dict:
    with Store(store, read_only=True) as db:
        return db.run(name)["config"]


def one_line_error(result, *words: str) -> None:
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip() and not line.startswith("loading the model")]
    assert len(lines) == 1 and lines[0].startswith("error:"), result.output
    assert all(word in lines[0] for word in words), lines[0]


def test_a_config_restores_itself_from_a_stored_run_checks_itself_against_it_and_names_itself():
    stored = json.loads(json.dumps(RunConfig(limit=4, seed=3, readout="generated", stages=(1, 3)).settings()))
    assert RunConfig.of_run({"config": stored, "model": "m", "name": "r"}) == RunConfig(
        model="m", limit=4, seed=3, readout="generated", stages=(1, 3), name="r")
    given = RunConfig(seed=5, explicit=("seed",))
    resumed = given.inherit(stored, skip=("readout",))
    assert (resumed.limit, resumed.seed, resumed.readout, resumed.stages) == (4, 5, "prompt", (1, 3))
    assert resumed.given() == {"seed", "limit", "stages", *(set(stored) - {"readout", "seed", "limit", "stages"})}
    assert resumed.mismatches(stored) == ["--seed 5 (the run has 3)", "--readout prompt (the run has generated)"]
    assert RunConfig.of_run({"config": stored}).mismatches(stored) == []

    name = resumed.default_name("models/tiny", "test")
    assert name == f"tiny-shapes-test-{resumed.digest()}" and resumed.digest() != given.digest()
    assert resumed.default_name("models/tiny", "test", taken={name, name + "-2"}) == name + "-3"
    assert RunConfig(preset="paper", max_new_tokens=4).with_preset().readout == "first-generated"
    with pytest.raises(ValueError, match="--max-new-tokens must be at least 2, got 1"):
        RunConfig(readout="first-generated", max_new_tokens=1).check()


def test_ablate_from_a_run_reuses_its_data_and_options(source):
    store, data = source
    result = runner.invoke(app, ["ablate", "--from", "src", "--select", "top", "--k", "0,1", "--store", store])
    assert result.exit_code == 0, result.output
    with Store(store, read_only=True) as db:
        points = db.runs()[db.runs()["curve"].notna()]
        assert len(points) == 2
        for point in points.itertuples():
            assert point.dataset == "pointqa" and point.n_samples == 4
            assert {k: point.config[k] for k in ("data", "prompt_style", "limit", "seed", "max_new_tokens")} == {
                "data": data, "prompt_style": "plain", "limit": 4, "seed": 3, "max_new_tokens": 2}
        assert set(db.samples(points.iloc[0]["name"])["sample_id"]) == set(db.samples("src")["sample_id"])


def test_an_option_given_to_ablate_overrides_the_run_and_is_recorded(source):
    store, _ = source
    result = runner.invoke(app, ["ablate", "--from", "src", "--select", "top", "--k", "1", "--limit", "2",
                                 "--store", store, "--format", "json"])
    assert result.exit_code == 0, result.output
    with Store(store, read_only=True) as db:
        point = db.runs().query("curve.notna() and n_samples == 2").iloc[0]
    assert point["config"]["limit"] == 2 and point["config"]["prompt_style"] == "plain"


def test_resume_reuses_the_stored_options_and_refuses_a_conflicting_one(tmp_path, llava):
    store = str(tmp_path / "s.duckdb")
    first = runner.invoke(app, ["run", "--model", llava.name, "--limit", "3", "--seed", "2", "--max-new-tokens", "1",
                                "--store", store, "--name", "r"])
    assert first.exit_code == 0, first.output
    again = runner.invoke(app, ["run", "--model", llava.name, "--store", store, "--name", "r", "--resume"])
    assert again.exit_code == 0, again.output
    with Store(store, read_only=True) as db:
        assert db.run("r")["n_samples"] == 3 and db.run("r")["config"]["limit"] == 3
    clash = runner.invoke(app, ["run", "--model", llava.name, "--store", store, "--name", "r", "--resume",
                                "--limit", "1000"])
    one_line_error(clash, "cannot resume run r", "--limit 1000 (the run has 3)")
    batch = runner.invoke(app, ["run", "--model", llava.name, "--store", store, "--name", "r", "--resume",
                                "--batch-size", "2", "--seed", "2"])
    assert batch.exit_code == 0, batch.output


def test_default_names_of_runs_with_other_settings_differ(tmp_path, llava):
    store = str(tmp_path / "s.duckdb")
    for limit in (2, 3, 2):
        run(RunConfig(limit=limit, max_new_tokens=1, store=store), loaded=llava)
    with Store(store, read_only=True) as db:
        names = list(db.runs()["name"])
    assert names[0] != names[1] and not names[1].startswith(names[0])
    assert names[2] == names[0] + "-2"


def test_merge_keeps_apart_same_named_runs_of_other_settings(tmp_path, llava):
    a, b = str(tmp_path / "a.duckdb"), str(tmp_path / "b.duckdb")
    run(RunConfig(limit=3, seed=0, max_new_tokens=1, store=a, name="demo"), loaded=llava)
    run(RunConfig(limit=2, seed=1, max_new_tokens=1, store=b, name="demo"), loaded=llava)
    result = runner.invoke(app, ["merge", b, "--into", a])
    one_line_error(result, "cannot merge run demo", "limit 3 != 2", "seed 0 != 1")


def test_run_configs_store_absolute_paths_so_other_folders_find_the_data(tmp_path, llava, monkeypatch):
    write_shapes(tmp_path / "data", n=4, seed=1)
    monkeypatch.chdir(tmp_path)
    run(RunConfig(dataset="pointqa", data="data/shapes.json", images="data", max_new_tokens=1,
                  store="s.duckdb", name="r"), loaded=llava)
    config = config_of(str(tmp_path / "s.duckdb"), "r")
    assert config["data"] == str(tmp_path / "data" / "shapes.json")
    assert config["images"] == str(tmp_path / "data")


def test_a_failed_data_or_model_load_leaves_no_store_file(tmp_path, llava):
    store = tmp_path / "new.duckdb"
    bad_data = runner.invoke(app, ["run", "--model", llava.name, "--dataset", "pointqa", "--data",
                                   str(tmp_path / "missing.json"), "--store", str(store)])
    assert bad_data.exit_code == 2 and not store.exists()
    bad_model = runner.invoke(app, ["run", "--model", str(tmp_path / "no-model"), "--limit", "2",
                                    "--store", str(store)])
    assert bad_model.exit_code == 2 and not store.exists()


@pytest.mark.parametrize("args, words", [
    (["run", "--limit", "0"], ("--limit 0", "at least 1")),
    (["run", "--limit", "-5"], ("--limit -5",)),
    (["run", "--seed", "-1"], ("--seed -1",)),
    (["run", "--readout", "first-generated", "--max-new-tokens", "1"], ("--max-new-tokens", "at least 2")),
    (["run", "--stages", "2,1"], ("--stages",)),
    (["run", "--stages", "1,5"], ("--stages 1,5", "< 3")),
    (["run", "--preset", "fast"], ("unknown --preset 'fast'",)),
    (["heads", "--run", "src", "--top", "-3"], ("--top -3",)),
    (["heads", "--run", "src", "--k", "1000"], ("--k 1000", "between 1 and 12")),
    (["heads", "--run", "src", "--k", "0"], ("--k 0",)),
    (["heads", "--run", "src", "--stages", "0,2"], ("--stages 0,2",)),
    (["ablate", "--from", "src", "--limit", "0"], ("--limit 0",)),
    (["ablate", "--from", "src", "--k", "0,1000"], ("K must be between 0 and 12",)),
    (["compare", "src", "src2", "--k", "1000"], ("--k 1000",)),
    (["data", "shapes", "--seed", "-2", "--out", "x"], ("--seed -2",)),
    (["train-demo", "--out", "x", "--steps", "0"], ("--steps 0",)),
    (["train-demo", "--out", "x", "--steps", "1", "--head-dropout", "1"], ("--head-dropout 1.0", "less than 1")),
])
def test_out_of_range_values_are_refused_with_one_line(source, llava, tmp_path, args, words):
    store, _ = source
    with Store(store) as db:
        if "src2" not in set(db.runs()["name"]):
            db.query("INSERT INTO runs SELECT * REPLACE (run_id + 100 AS run_id, 'src2' AS name) FROM runs "
                     "WHERE name = 'src'")
            for table in ("samples", "head_stats"):
                db.query(f"INSERT INTO {table} SELECT * REPLACE (run_id + 100 AS run_id) FROM {table} "
                         "WHERE run_id = (SELECT run_id FROM runs WHERE name = 'src')")
    if args[0] == "run":
        args = [*args, "--model", llava.name, "--store", str(tmp_path / "fresh.duckdb")]
    elif args[0] in ("heads", "ablate", "compare"):
        args = [*args, "--store", store]
    one_line_error(runner.invoke(app, args), *words)
    assert not (tmp_path / "fresh.duckdb").exists()


def test_head_scores_count_only_samples_with_the_readout_row(tmp_path):
    path = tmp_path / "s.duckdb"
    with Store(path) as store:
        handle = store.start_run("half", model="m", family="llava", dataset="d", split="", layers=1, heads=2,
                                 readout="first-generated", ablation="none", config={})
        w = np.array([[[0.9, 0.1]], [[0.8, 0.2]], [[np.nan, np.nan]], [[np.nan, np.nan]]], np.float32)
        samples = [{"sample_id": f"s{i}"} for i in range(4)]
        store.add_batch(handle, samples, w, w, None, None, None)
        store.finish_run(handle)
        none = store.start_run("none", model="m", family="llava", dataset="d", split="", layers=1, heads=2,
                               readout="first-generated", ablation="none", config={})
        store.add_batch(none, samples[:2], *[np.full((2, 1, 2), np.nan, np.float32)] * 2, None, None, None)
        store.finish_run(none)
        half = head_table(store, "half", k=1)
        in_sql = store.query(README_SQL.replace("run_id = 1", f"run_id = {handle.run_id}").replace("<= 6", "<= 1"))
    assert list(half["score"]) == [1.0, 0.0] and half.attrs["scored"] == 2
    assert list(in_sql["score"]) == [1.0, 0.0]
    with Store(path, read_only=True) as store:
        compared = compare_runs(store, ["half", "none"])
    assert any("run none: head scores are undefined" in w for w in compared.warnings)
    result = runner.invoke(app, ["heads", "--run", "none", "--store", str(path), "--format", "json"])
    assert result.exit_code == 0, result.output
    assert [row["score"] for row in json.loads(result.stdout)] == [None, None]
    assert "head scores are undefined" in result.stderr and "--max-new-tokens" in result.stderr


def test_stage_boundaries_are_stored_with_the_run_and_used_by_heads(tmp_path, llava):
    store = str(tmp_path / "s.duckdb")
    result = runner.invoke(app, ["run", "--model", llava.name, "--limit", "2", "--max-new-tokens", "1",
                                 "--stages", "1,2", "--store", store, "--name", "r"])
    assert result.exit_code == 0, result.output
    assert config_of(store, "r")["stages"] == [1, 2]
    with Store(store, read_only=True) as db:
        table = head_table(db, "r")
    assert dict(zip(table["layer"], table["stage"], strict=False)) == {0: "early", 1: "mid", 2: "late"}
    assert table.attrs["stages"] == (1, 2)
    late = runner.invoke(app, ["run", "--model", llava.name, "--limit", "2", "--max-new-tokens", "1",
                               "--ablate", "stage:late", "--stages", "1,2", "--store", store, "--name", "late"])
    assert late.exit_code == 0, late.output
    with Store(store, read_only=True) as db:
        assert db.run("late")["ablation"] == "zero:2.0,2.1,2.2,2.3"


def test_the_paper_preset_reads_the_first_generated_row_and_options_given_win(tmp_path, llava):
    store = str(tmp_path / "s.duckdb")
    result = runner.invoke(app, ["run", "--model", llava.name, "--limit", "2", "--preset", "paper",
                                 "--max-new-tokens", "3", "--store", store, "--name", "paper"])
    assert result.exit_code == 0, result.output
    config = config_of(store, "paper")
    assert config["preset"] == "paper" and config["readout"] == "first-generated"
    assert config["max_new_tokens"] == 3 and config["stages"] == [1, 2]
    with Store(store, read_only=True) as db:
        assert db.run("paper")["readout"] == "first-generated"


def test_prompts_longer_than_the_model_positions_are_warned_once_and_counted(tmp_path, model_dirs, caplog):
    short = load(model_dirs("llava"))
    short.model.config.get_text_config().max_position_embeddings = 8
    with caplog.at_level("WARNING", logger="vheads.run"):
        summary = run(RunConfig(limit=3, batch_size=1, max_new_tokens=1, store=str(tmp_path / "s.duckdb"),
                                name="long"), loaded=short)
    assert summary.long_prompts == 3 and summary.max_positions == 8
    assert sum("longer than the model's 8 positions" in r.getMessage() for r in caplog.records) == 1


def six_layer_run(path, stages=None):
    """A stored 6-layer x 2-head run whose W grows with the layer, so late heads rank first."""
    with Store(path) as store:
        handle = store.start_run("deep", model="m", family="llava", dataset="d", split="", layers=6, heads=2,
                                 readout="prompt", ablation="none", config={"stages": stages})
        w = np.tile(np.linspace(0.01, 0.12, 12, dtype=np.float32).reshape(1, 6, 2), (3, 1, 1))
        store.add_batch(handle, [{"sample_id": f"s{i}"} for i in range(3)], w, w, None, None, None)
        store.finish_run(handle)


def test_user_stages_drive_the_heads_table_and_the_selectors(tmp_path):
    from vheads.analysis.selectors import resolve_heads

    path = tmp_path / "s.duckdb"
    six_layer_run(path, stages=[1, 5])
    with Store(path, read_only=True) as db:
        stored = head_table(db, "deep")
        assert dict(zip(stored["layer"], stored["stage"], strict=False)) == {
            0: "early", 1: "mid", 2: "mid", 3: "mid", 4: "mid", 5: "late"}
        assert resolve_heads("late:2", db, "deep") == [(5, 0), (5, 1)]
        assert resolve_heads("stage:early", db, "deep") == [(0, 0), (0, 1)]
        assert resolve_heads("stage:late", db, "deep", stages=(3, 4)) == [(4, 0), (4, 1), (5, 0), (5, 1)]
    result = runner.invoke(app, ["heads", "--run", "deep", "--stages", "2,4", "--top", "0", "--store", str(path),
                                 "--format", "json"])
    assert result.exit_code == 0, result.output
    stages = {row["layer"]: row["stage"] for row in json.loads(result.stdout)}
    assert stages == {0: "early", 1: "early", 2: "mid", 3: "mid", 4: "late", 5: "late"}


def test_the_report_shows_the_stored_stages_or_those_given(tmp_path):
    path = tmp_path / "s.duckdb"
    six_layer_run(path, stages=[1, 5])
    stored = runner.invoke(app, ["report", "--store", str(path), "--out", str(tmp_path / "a"), "--overlays", "0"])
    assert stored.exit_code == 0, stored.output
    assert "mid from 1, late from 5" in (tmp_path / "a" / "index.html").read_text()
    given = runner.invoke(app, ["report", "--store", str(path), "--out", str(tmp_path / "b"), "--overlays", "0",
                                "--stages", "2,4"])
    assert given.exit_code == 0, given.output
    assert "mid from 2, late from 4" in (tmp_path / "b" / "index.html").read_text()


def test_resume_refuses_another_pixel_cap_and_accepts_a_restated_value(tmp_path, llava):
    store = str(tmp_path / "s.duckdb")
    first = runner.invoke(app, ["run", "--model", llava.name, "--limit", "2", "--max-new-tokens", "1",
                                "--store", store, "--name", "r"])
    assert first.exit_code == 0, first.output
    cap = runner.invoke(app, ["run", "--model", llava.name, "--store", store, "--name", "r", "--resume",
                              "--max-pixels", "50000"])
    one_line_error(cap, "cannot resume run r", "--max-pixels 50000 (the run has 50000000)")
    plain = runner.invoke(app, ["run", "--model", llava.name, "--store", store, "--name", "r", "--resume",
                                "--prompt-style", "plain"])
    one_line_error(plain, "cannot resume run r", "--prompt-style plain (the run has the default, visual)")
    for restated in (["--prompt-style", "visual"], ["--split", "test"], ["--max-pixels", "50000000"],
                     ["--max-new-tokens", "1", "--limit", "2"]):
        again = runner.invoke(app, ["run", "--model", llava.name, "--store", store, "--name", "r", "--resume",
                                    *restated])
        assert again.exit_code == 0, again.output
    assert config_of(store, "r")["prompt_style"] is None and config_of(store, "r")["split"] is None


def test_resume_of_a_run_that_does_not_exist_names_it_and_the_nearby_ones(tmp_path, llava):
    store = str(tmp_path / "s.duckdb")
    run(RunConfig(limit=1, max_new_tokens=1, store=store, name="pope-main"), loaded=llava)
    typo = runner.invoke(app, ["run", "--model", llava.name, "--store", store, "--name", "pope-mian", "--resume"])
    one_line_error(typo, "no run 'pope-mian'", "pope-main")
    with Store(store, read_only=True) as db:
        assert list(db.runs()["name"]) == ["pope-main"]


def test_ablate_from_a_paper_preset_run_keeps_the_options_given_at_their_default_value(tmp_path, llava):
    store = str(tmp_path / "s.duckdb")
    paper = runner.invoke(app, ["run", "--model", llava.name, "--limit", "2", "--preset", "paper",
                                "--max-new-tokens", "3", "--store", store, "--name", "paper"])
    assert paper.exit_code == 0, paper.output
    point = runner.invoke(app, ["ablate", "--from", "paper", "--select", "top", "--k", "0", "--readout", "prompt",
                                "--max-new-tokens", "8", "--store", store])
    assert point.exit_code == 0, point.output
    with Store(store, read_only=True) as db:
        runs = db.runs()
    config = runs[runs["curve"].notna()].iloc[0]["config"]
    assert config["readout"] == "prompt" and config["max_new_tokens"] == 8 and config["preset"] == "paper"


def test_a_limit_past_what_shapes_can_hold_is_one_line(tmp_path, llava):
    result = runner.invoke(app, ["run", "--model", llava.name, "--limit", "1000000000",
                                 "--store", str(tmp_path / "s.duckdb")])
    one_line_error(result, "--limit 1000000000", "ShapesQA", "100,000")
    assert not (tmp_path / "s.duckdb").exists()
