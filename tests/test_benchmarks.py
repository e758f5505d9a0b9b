"""The benchmark scripts state and pin the conditions of their README tables (threads, device, dtype)."""

from __future__ import annotations

import importlib.util
import os
import runpy
import subprocess
import sys
from pathlib import Path

import pytest
import torch

BENCHMARKS = Path(__file__).parent.parent / "benchmarks"


def run_script(name: str, args: list[str], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> str:
    """A benchmark script run as `python benchmarks/NAME ARGS` would run it, but in this process (no start-up of
    torch and transformers); its stdout. The torch settings it changes (threads, grad mode) are put back after."""
    threads, grad = torch.get_num_threads(), torch.is_grad_enabled()
    monkeypatch.setattr(sys, "argv", [str(BENCHMARKS / name), *args])
    capsys.readouterr()
    try:
        runpy.run_path(str(BENCHMARKS / name), run_name="__main__")
    finally:
        torch.set_num_threads(threads)
        torch.set_grad_enabled(grad)
    return capsys.readouterr().out


def test_the_end_to_end_benchmark_runs_on_one_thread_by_default_and_says_so(monkeypatch, capsys):
    threads = torch.get_num_threads()
    torch.set_num_threads(2)  # not the script's default, so that the line shows the script's own setting
    try:
        out = run_script("run.py", ["--n", "2", "--batch-size", "2", "--repeats", "1", "--max-new-tokens", "1"],
                         monkeypatch, capsys)
    finally:
        torch.set_num_threads(threads)
    assert "cpu, float32, 1 torch thread(s)" in out


def test_the_capture_benchmark_takes_threads_device_and_dtype_defaulting_to_its_table():
    usage = subprocess.run([sys.executable, str(BENCHMARKS / "capture.py"), "--help"], capture_output=True, text=True,
                           env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}, timeout=300).stdout
    for option in ("--threads", "--device", "--dtype"):
        assert option in usage, option
    assert "the README table used 1" in " ".join(usage.split())


def test_the_grounding_benchmark_prints_its_table_and_the_issue_check(monkeypatch, capsys):
    out = run_script("grounding.py", ["--limit", "4", "--choose-limit", "4", "--k", "2"], monkeypatch, capsys)
    assert "1 torch thread(s)" in out and "| heads | chosen | pointing | IoU | acc50 |" in out
    for row in ("`localization:2`", "`pointing:2`", "`top:2`", "`random:2:2`", "random:2, mean of 3 seeds"):
        assert row in out, row
    assert "(target >= 0.6 and >= 2x)" in out


def test_the_capture_benchmark_takes_any_prompt_length():
    spec = importlib.util.spec_from_file_location("capture_benchmark", BENCHMARKS / "capture.py")
    capture = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(capture)
    assert [capture.image_tokens(n) for n in (700, 2900, 8192, 64)] == [576, 2880, 14 * 576, 44]
    ids = capture.inputs_for(8192, "cpu")
    assert ids.shape == (1, 8192)
    assert int((ids == capture.IMAGE_ID).sum()) == 14 * 576
    assert (ids[0, capture.PREFIX:capture.PREFIX + 14 * 576] == capture.IMAGE_ID).all()
    usage = subprocess.run([sys.executable, str(BENCHMARKS / "capture.py"), "--lengths", "700,12"],
                           capture_output=True, text=True, timeout=300)
    assert usage.returncode == 2 and "--lengths 700,12: a prompt of 12 tokens leaves no room" in usage.stderr
