"""Ordinary mistakes on the command line end in one clear line and exit 2, never a traceback or a silent overwrite."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from vheads.cli import app
from vheads.store import Store

runner = CliRunner(env={"COLUMNS": "80"})


@pytest.fixture()
def empty_store(tmp_path: Path) -> str:
    path = str(tmp_path / "s.duckdb")
    with Store(path):
        pass
    return path


def one_error_line(result, *needles: str) -> None:
    """The command failed with exit 2 and its last line is an error naming every needle."""
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    last = result.output.strip().splitlines()[-1]
    assert last.startswith("error:"), result.output
    for needle in needles:
        assert needle in last, last


@pytest.mark.parametrize("device,needle", [("foo", "--device 'foo'"), ("cuda:x", "--device 'cuda:x'")]
                         + ([] if torch.cuda.is_available() else [("cuda", "no CUDA")]))
def test_a_device_this_machine_lacks_is_one_line(tmp_path, device, needle):
    result = runner.invoke(app, ["run", "--limit", "2", "--device", device, "--store", str(tmp_path / "d.duckdb")])
    one_error_line(result, needle)
    assert not (tmp_path / "d.duckdb").exists() or "Traceback" not in result.output


@pytest.mark.parametrize("command", [["export"], ["report"], ["data", "shapes", "--n", "2"]])
def test_out_naming_an_existing_file_is_one_line(tmp_path, empty_store, command):
    target = tmp_path / "taken.txt"
    target.write_text("keep me")
    store = [] if command[0] == "data" else ["--store", empty_store]
    result = runner.invoke(app, [*command, *store, "--out", str(target)])
    one_error_line(result, str(target), "not a folder")
    assert target.read_text() == "keep me"


@pytest.mark.parametrize("sql", ["", "   ", " ; ", "/* only a comment */"])
def test_an_empty_query_is_one_line(empty_store, sql):
    one_error_line(runner.invoke(app, ["query", sql, "--store", empty_store]), "SQL")


def test_a_failed_merge_is_one_line_and_leaves_no_store_behind(tmp_path):
    bad = tmp_path / "bad.duckdb"
    bad.write_text("not a store")
    result = runner.invoke(app, ["merge", str(bad), "--into", str(tmp_path / "new.duckdb")])
    one_error_line(result, str(bad))
    assert not (tmp_path / "new.duckdb").exists()


def test_an_ambiguous_run_reference_is_one_line_naming_both(tmp_path):
    from test_store import fake_batch, start

    path = str(tmp_path / "s.duckdb")
    with Store(path) as store:
        for name in ("a", "b", "c", "d"):
            run = start(store, name)
            store.add_batch(run, *fake_batch([0, 1]))
            store.finish_run(run)
        store.query("UPDATE runs SET name = '3' WHERE name = 'd'")  # as a vheads before digit names were refused
    one_error_line(runner.invoke(app, ["heads", "--run", "3", "--store", path]), "'3' is ambiguous", "'c'",
                   "name:3", "id:3")
    assert "heads of 3 " in runner.invoke(app, ["heads", "--run", "name:3", "--store", path]).stdout
    assert "heads of c " in runner.invoke(app, ["heads", "--run", "id:3", "--store", path]).stdout
    assert "id:N" in runner.invoke(app, ["heads", "--help"]).stdout


def test_export_refuses_to_overwrite_parquet_unless_forced(tmp_path, empty_store):
    out = tmp_path / "pq"
    assert runner.invoke(app, ["export", "--store", empty_store, "--out", str(out)]).exit_code == 0
    again = runner.invoke(app, ["export", "--store", empty_store, "--out", str(out)])
    one_error_line(again, "runs.parquet", "--force")
    forced = runner.invoke(app, ["export", "--store", empty_store, "--out", str(out), "--force"])
    assert forced.exit_code == 0, forced.output


def test_a_mistyped_model_folder_fails_at_once_naming_it(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models").mkdir()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    began = time.monotonic()
    offline = runner.invoke(app, ["run", "--limit", "2", "--model", "mymodel"])
    one_error_line(offline, "mymodel", "no model folder")
    monkeypatch.delenv("HF_HUB_OFFLINE")
    partial = runner.invoke(app, ["run", "--limit", "2", "--model", "models/llava-typo"])
    one_error_line(partial, "model path models/llava-typo does not exist")
    assert time.monotonic() - began < 30


def test_a_pickle_only_model_folder_says_how_to_convert_it(tmp_path, model_dirs):
    folder = tmp_path / "pickled"
    folder.mkdir()
    for item in model_dirs("llava").iterdir():
        if item.suffix != ".safetensors":
            (folder / item.name).write_bytes(item.read_bytes())
    (folder / "pytorch_model.bin").write_bytes(b"not loaded")
    result = runner.invoke(app, ["run", "--limit", "2", "--model", str(folder), "--store", str(tmp_path / "s.duckdb")])
    one_error_line(result, "pytorch_model.bin", "safetensors", "save_pretrained")


@pytest.mark.parametrize("args,needles", [
    (["run", "--batch-size", "0"], ["--batch-size", "greater than or equal to 1", "run --help"]),
    (["run", "--bogus"], ["No such option: --bogus"]),
    (["report", "--overlays", "-1"], ["--overlays"]),
    (["no-such-command"], ["No such command"]),
])
def test_a_mistyped_option_or_a_value_out_of_its_range_is_one_line(args, needles):
    result = runner.invoke(app, args)
    one_error_line(result, *needles)
    assert len([line for line in result.output.splitlines() if line.strip()]) == 1, result.output
