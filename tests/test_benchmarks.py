"""The benchmark scripts state and pin the conditions of their README tables (threads, device, dtype)."""

from __future__ import annotations

import importlib.util
import json
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


def load_benchmark(name: str):
    """A benchmark script imported as a module (its functions, not its main)."""
    spec = importlib.util.spec_from_file_location(f"{name}_benchmark", BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


def test_the_pruning_benchmark_counts_the_pairs_each_head_computes_as_a_mask_would():
    prune = load_benchmark("prune")
    layout, decode = prune.Layout(images=7, prefix=3, question=4), 2
    n = layout.length
    image = set(range(layout.prefix, layout.prefix + layout.images))
    rows = list(range(n)) + [n + t for t in range(decode)]  # prefill rows, then one row per decode step

    def counted(sees_image):  # (row, key) pairs under a causal mask and a rule for image keys
        return sum(1 for row in rows for key in range(row + 1) if key not in image or sees_image(row))

    assert prune.pairs(layout, decode, "all") == counted(lambda row: True)
    assert prune.pairs(layout, decode, "text") == counted(lambda row: False)
    assert prune.pairs(layout, decode, "flow") == counted(lambda row: row in image)
    assert prune.pairs(layout, decode, "text") < prune.pairs(layout, decode, "flow") < prune.pairs(layout, decode,
                                                                                                   "all")


def test_the_pruning_benchmark_costs_blind_heads_and_fastv_by_what_they_keep():
    prune = load_benchmark("prune")
    geometry = prune.Geometry(layers=3, hidden=64, heads=8, kv_heads=8, mlp=32)
    layout, decode, d = prune.Layout(images=40), 5, 8
    per_position = 2 * d * 4 * geometry.kv_heads  # a key and a value per key/value head, fp32
    plain = prune.cost(prune.Method("plain"), geometry, layout, decode, "float32")
    assert plain.kv_bytes == 3 * (layout.length + decode) * per_position
    assert plain.image_kv_bytes == 3 * 40 * per_position
    assert plain.flops == 3 * 8 * 4 * d * prune.pairs(layout, decode, "all")

    blind = prune.cost(prune.Method("image-blind", 0.25), geometry, layout, decode, "float32", seed=1)
    assert blind.keeping == {0: 2, 1: 2, 2: 2}
    assert blind.image_kv_bytes * 4 == plain.image_kv_bytes
    assert blind.kv_bytes == blind.image_kv_bytes + 3 * (layout.length - 40 + decode) * per_position
    assert blind.flops == 3 * 4 * d * (2 * prune.pairs(layout, decode, "all") + 6 * prune.pairs(layout, decode, "text"))
    flow = prune.cost(prune.Method("flow-blind", 0.25), geometry, layout, decode, "float32", seed=1)
    assert flow.image_kv_bytes == blind.image_kv_bytes and blind.flops < flow.flops < plain.flops
    everyone = prune.cost(prune.Method("image-blind", 1.0), geometry, layout, decode, "float32")
    assert (everyone.flops, everyone.kv_bytes) == (plain.flops, plain.kv_bytes)

    fastv = prune.cost(prune.Method("fastv", 0.25, layer=1), geometry, layout, decode, "float32")
    kept = prune.Layout(images=10)  # ceil(0.25 * 40) image tokens from layer 1 on
    assert fastv.flops == 8 * 4 * d * (prune.pairs(layout, decode, "all") + 2 * prune.pairs(kept, decode, "all"))
    assert fastv.image_kv_bytes == (40 + 2 * 10) * per_position


def test_the_pruning_benchmark_keeps_the_image_in_a_fixed_random_share_of_each_layers_heads():
    prune = load_benchmark("prune")
    assert [prune.heads_keeping(32, share) for share in (1, 0.25, 0.1, 0.05, 0)] == [32, 8, 3, 2, 0]
    geometry = prune.Geometry(layers=4)
    kept = prune.kept_heads(geometry, 0.1, seed=0)
    assert kept == prune.kept_heads(geometry, 0.1, seed=0) != prune.kept_heads(geometry, 0.1, seed=1)
    assert all(len(heads) == 3 for heads in kept.values()) and len({tuple(h) for h in kept.values()}) > 1
    blind = prune.blind_heads(geometry, kept)
    assert len(blind) == 4 * 29 and not {(layer, head) for layer in kept for head in kept[layer]} & set(blind)


def test_the_pruning_benchmark_prints_its_table_at_a_tiny_geometry(monkeypatch, capsys, tmp_path):
    out = run_script("prune.py", ["--hidden", "32", "--heads", "4", "--mlp", "32", "--images", "24", "--decode", "2",
                                  "--repeats", "1", "--shares", "1,0.25", "--in-process", "--json",
                                  str(tmp_path / "rows.json")], monkeypatch, capsys)
    assert "2 layers, hidden 32, 4 heads (4 key/value), MLP 32, float32 on cpu, 1 torch thread(s)" in out
    assert "| image tokens | method | heads keeping the image | prefill s |" in out
    assert "| 24 | plain | all |" in out
    stored = json.loads((tmp_path / "rows.json").read_text())["rows"]
    rows = {row["method"] + f" {row['share']:g}": row for row in stored}
    plain, blind = rows["plain 1"], rows["image-blind 0.25"]
    assert plain["kv_bytes"] == plain["analytic_kv_bytes"] and plain["image_kv_bytes"] == 24 * 2 * 4 * 8 * 4 * 2
    assert blind["cache"] == "vheads" and blind["image_kv_bytes"] * 4 == plain["image_kv_bytes"]
    assert rows["image-blind, masked 0.1"]["kv_bytes"] == plain["kv_bytes"]  # masked: the plain cache holds it all
    assert "| 24 | image-blind | 1/4 |" in out and "| 24 | fastv K=1 R=0.5 | all |" in out
    assert blind["paired_prefill_s"] > 0 and plain["paired_prefill_s"] is None  # plain timed beside each method
    again = run_script("prune.py", ["--rows", str(tmp_path / "rows.json")], monkeypatch, capsys)
    table = [line for line in out.splitlines() if line.startswith("| 24 |")]
    assert len(table) == len(stored) and [line for line in again.splitlines() if line.startswith("| 24 |")] == table


def test_the_pruning_benchmark_names_the_bad_option(monkeypatch, capsys):
    for args, message in ((["--shares", "1,1.5"], "--shares 1,1.5: 1.5 lies outside [0, 1]"),
                          (["--fastv-keep", "0"], "--fastv-keep 0: 0 lies outside (0, 1]"),
                          (["--modes", "plain,fast"], "--modes plain,fast: unknown fast"),
                          (["--layers", "1"], "--fastv-layer 1: FastV's K lies in [1, layers)"),
                          (["--images", "576,0"], "--images 576,0: give positive image-token counts")):
        with pytest.raises(SystemExit) as exit_:
            run_script("prune.py", args, monkeypatch, capsys)
        assert exit_.value.code == 2 and message in capsys.readouterr().err, args
