"""The command line as a user reads it: 80-column tables, table/csv/json listings, literal user text, progress,
defaults in every --help, and skip warnings summarised."""

from __future__ import annotations

import json

import click
import pytest
import typer
from test_data_formats import write_image, write_jsonl
from typer.testing import CliRunner

from vheads.cli import app
from vheads.models import load
from vheads.pipeline.config import RunConfig
from vheads.pipeline.run import run

NARROW = {"COLUMNS": "80"}
runner = CliRunner(env=NARROW)
NAMES = ("exp[1]:x:", "demo-shapes-test-readout-comparison-a", "demo-shapes-test-readout-comparison-b")


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> str:
    """A store with three short demo runs; one name holds Rich markup and an emoji code."""
    path = str(tmp_path_factory.mktemp("cli") / "s.duckdb")
    demo = load(None)
    for i, name in enumerate(NAMES):
        run(RunConfig(limit=3, store=path, name=name, seed=i), loaded=demo)
    return path


def invoke(*args: str) -> click.testing.Result:
    return runner.invoke(app, list(args))


def fits(text: str, width: int = 80) -> bool:
    """Every table line of `text` is at most `width` wide (plain lines such as long paths may run on)."""
    return all(len(line) <= width for line in text.splitlines() if line[:1] in "┏┃┡│└")


def column(table: str, index: int) -> list[str]:
    """The cells of one column of the first box-drawn table in `table`, folded lines joined back together.

    A line starts a new row when its last cell is filled (the tables here end in a number)."""
    cells: list[str] = []
    for line in table.split("┡", 1)[1].splitlines()[1:]:
        if not line.startswith("│"):
            break
        parts = [part.strip() for part in line.strip("│").split("│")]
        if parts[-1]:
            cells.append(parts[index])
        else:
            cells[-1] += parts[index]
    return cells


def test_runs_fit_80_columns_with_every_name_whole(store):
    result = invoke("runs", "--store", store)
    assert result.exit_code == 0, result.output
    assert fits(result.stdout)
    assert "…" not in result.stdout
    assert column(result.stdout, 1) == list(NAMES)
    assert "❌" not in result.stdout


def test_heads_table_has_short_headers_and_a_legend(store):
    result = invoke("heads", "--run", NAMES[0], "--store", store, "--top", "3")
    assert result.exit_code == 0, result.output
    assert "…" not in result.stdout and fits(result.stdout)
    assert "heads of exp[1]:x:" in result.stdout
    assert "W: mean visual weight" in " ".join(result.stdout.split())


def test_compare_pairs_name_both_runs_in_full(store):
    result = invoke("compare", NAMES[1], NAMES[2], "--store", store)
    assert result.exit_code == 0, result.output
    assert "…" not in result.stdout and fits(result.stdout)
    assert set(column(result.stdout, 0)) == {NAMES[1]} and set(column(result.stdout, 1)) == {NAMES[2]}


@pytest.mark.parametrize("args", [
    ("runs",), ("heads", "--top", "2"), ("query", "SELECT run_id, name FROM runs"), ("data", "list"),
    ("compare", NAMES[1], NAMES[2]),
])
def test_every_listing_speaks_csv_and_json(store, args):
    extra = () if args[0] == "data" else ("--store", store)
    as_json = invoke(*args, *extra, "--format", "json")
    assert as_json.exit_code == 0, as_json.output
    assert json.loads(as_json.stdout)
    as_csv = invoke(*args, *extra, "--format", "csv")
    assert as_csv.exit_code == 0, as_csv.output
    assert "," in as_csv.stdout.splitlines()[0] or as_csv.stdout.startswith("#")
    bad = invoke(*args, *extra, "--format", "xml")
    assert bad.exit_code == 2 and "--format" in bad.output


def test_ablate_speaks_csv(store):
    result = invoke("ablate", "--from", NAMES[0], "--select", "top", "--k", "0", "--limit", "2", "--store", store,
                    "--format", "csv")
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines()[0].startswith("selector,k,seed,accuracy")


def test_missing_values_read_the_same_in_every_format(store):
    sql = "SELECT 1 AS a, NULL AS b, 'x' AS c"
    assert "—" in invoke("query", sql, "--store", store).stdout
    assert invoke("query", sql, "--store", store, "--format", "csv").stdout.splitlines()[1] == "1,,x"
    assert json.loads(invoke("query", sql, "--store", store, "--format", "json").stdout) == [
        {"a": 1, "b": None, "c": "x"}]


@pytest.fixture()
def small_store(tmp_path) -> str:
    """A store with one run written directly (no model): config {"batch_size": 4}."""
    from test_store import start

    from vheads.store import Store

    path = str(tmp_path / "small.duckdb")
    with Store(path) as db:
        db.finish_run(start(db, "r"))
    return path


def test_a_query_too_wide_for_80_columns_goes_on_below_instead_of_losing_columns(small_store):
    names = [f"figure_{i:02d}" for i in range(14)]
    sql = "SELECT " + ", ".join(f"{123456 * i} AS {name}" for i, name in enumerate(names))
    result = invoke("query", sql, "--store", small_store)
    assert result.exit_code == 0, result.output
    assert fits(result.stdout)
    assert all(str(123456 * i) in result.stdout for i in range(1, 14))
    assert "columns 1–" in result.stdout and "of 14" in result.stdout


def test_json_keeps_infinities_nan_big_integers_and_json_columns(small_store):
    sql = ("SELECT 'inf'::DOUBLE AS up, '-inf'::DOUBLE AS down, 'nan'::DOUBLE AS nan, NULL::DOUBLE AS missing, "
           "9007199254740993::HUGEINT AS big, 4611686018427387905::BIGINT AS bigint, config, "
           "[1.5, 'inf'::DOUBLE] AS list FROM runs")
    result = invoke("query", sql, "--store", small_store, "--format", "json")
    assert result.exit_code == 0, result.output
    assert "Infinity" not in result.stdout and "NaN" not in result.stdout
    assert json.loads(result.stdout) == [{"up": "inf", "down": "-inf", "nan": "nan", "missing": None,
                                          "big": 9007199254740993, "bigint": 4611686018427387905,
                                          "config": {"batch_size": 4}, "list": [1.5, "inf"]}]
    as_csv = invoke("query", sql, "--store", small_store, "--format", "csv").stdout.splitlines()
    assert as_csv[1] == 'inf,-inf,nan,,9007199254740993,4611686018427387905,"{""batch_size"": 4}","[1.5, ""inf""]"'
    table = invoke("query", sql, "--store", small_store).stdout
    assert "9007199254740993" in table and "nan" in table and "-inf" in table


def test_user_text_in_errors_is_printed_literally(store):
    result = invoke("heads", "--run", "[red]nope:smile:", "--store", store)
    assert result.exit_code == 2
    assert "[red]nope:smile:" in result.output


def test_a_run_prints_plain_progress_and_a_loading_line_when_stderr_is_not_a_terminal(tmp_path):
    result = invoke("run", "--limit", "4", "--batch-size", "2", "--store", str(tmp_path / "p.duckdb"))
    assert result.exit_code == 0, result.output
    assert "loading" in result.stderr
    assert "run: 4/4 samples" in result.stderr


def test_a_run_with_1000_missing_images_prints_a_bounded_number_of_lines(tmp_path):
    write_image(tmp_path / "ok.png")
    records = [{"question_id": i, "image": "ok.png" if i < 2 else f"gone-{i}.png", "text": "Is there a square?",
                "label": "yes"} for i in range(1002)]
    data = write_jsonl(tmp_path / "q.jsonl", records)
    result = invoke("run", "--dataset", "jsonl", "--data", str(data), "--store", str(tmp_path / "m.duckdb"))
    assert result.exit_code == 0, result.output
    assert len(result.stderr.splitlines()) <= 12
    assert "1,000 records skipped: missing image" in result.stderr
    assert "skipped 1000" in result.stdout


def _commands(group: click.Group, prefix: str = "") -> list[tuple[str, click.Command]]:
    found = []
    for name, command in group.commands.items():
        if isinstance(command, click.Group):
            found += _commands(command, f"{prefix}{name} ")
        else:
            found.append((prefix + name, command))
    return found


def test_every_option_says_its_default():
    group = typer.main.get_command(app)
    missing = []
    for name, command in _commands(group):
        for param in command.params:
            if not isinstance(param, click.Option) or param.required or param.is_flag or param.name == "help":
                continue
            if param.default is None and "default" not in (param.help or "").lower():
                missing.append(f"{name} {param.opts[0]}")
    assert not missing, missing
    assert "1,000" in invoke("run", "--help").stdout
