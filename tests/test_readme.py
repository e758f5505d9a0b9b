"""The README's quick start, run as written on the embedded demo model (only the first run's size is cut)."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
from typer.testing import CliRunner

from vheads.cli import app

README = Path(__file__).resolve().parents[1] / "README.md"
SMALLER = {"run": ["--limit", "8"]}
EXPECTED = {"run": "accuracy", "heads": "score", "ablate": "pruning curve", "ground": "localization:4",
            "report": "index.html"}


def quick_start_commands(text: str) -> list[list[str]]:
    """The `vheads` command lines of the first code block under '## Quick start', comments dropped."""
    section = text.split("\n## Quick start", 1)[1]
    block = re.search(r"```\n(.*?)```", section, re.S).group(1)
    lines = [line.split("#", 1)[0].strip() for line in block.splitlines()]
    return [shlex.split(line)[1:] for line in lines if line.startswith("vheads ")]


def test_the_quick_start_tells_the_whole_story() -> None:
    commands = quick_start_commands(README.read_text())
    assert [c[0] for c in commands] == ["run", "heads", "ablate", "ground", "report"]


def test_the_quick_start_runs_as_written(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    runner = CliRunner()
    for args in quick_start_commands(README.read_text()):
        args = args + SMALLER.get(args[0], [])
        result = runner.invoke(app, args)
        assert result.exit_code == 0, f"vheads {shlex.join(args)}:\n{result.output}"
        assert EXPECTED[args[0]] in result.output, f"vheads {shlex.join(args)}:\n{result.output}"
    assert (tmp_path / "vheads-report" / "index.html").is_file()
    assert (tmp_path / "vheads.duckdb").is_file()
