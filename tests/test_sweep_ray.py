"""`vheads sweep` on a real Ray cluster started for this module (2 CPUs, `ray start --head` in its own folder)."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import pytest
from typer.testing import CliRunner

from vheads.cli import app
from vheads.data import write_shapes
from vheads.pipeline.config import RunConfig
from vheads.store import Store
from vheads.sweep.driver import plan, run_sweep

SRC = str(Path(__file__).resolve().parents[1] / "src")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def kill_processes_of(root: Path) -> None:
    """Kill the processes this module's cluster started (those naming its temp folder), and no other."""
    for p in psutil.process_iter(["cmdline"]):
        if any(str(root) in part for part in p.info["cmdline"] or ()):
            with contextlib.suppress(psutil.Error):
                p.kill()


@pytest.fixture(scope="module")
def cluster():
    """The address of a 2-CPU Ray head started in a folder of its own; stopped (every process of it) afterwards."""
    root = Path(tempfile.mkdtemp(prefix="vr"))
    head = root / "head"
    head.mkdir()
    port = free_port()
    # Ray's idle workers import the sweep's worker module (torch, transformers) as they start, with the head:
    # an actor placed on one then skips that import. Nothing else of the cluster changes.
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (SRC, os.environ.get("PYTHONPATH")) if p),
           "RAY_AUTH_MODE": "disabled", "RAY_preload_python_modules": "vheads.sweep.workers"}
    ray = str(Path(sys.executable).parent / "ray")
    command = [ray, "start", "--head", "--block", "--num-cpus", "2", "--num-gpus", "0", "--port", str(port),
               "--node-ip-address", "127.0.0.1", "--temp-dir", str(root / "t"), "--include-dashboard", "false",
               "--disable-usage-stats"]
    proc = None
    try:
        for _ in range(3):  # Ray gives its node 30 s to come up, which a loaded machine can miss
            with open(root / "head.log", "w") as log:
                proc = subprocess.Popen(command, cwd=head, env=env, stdout=log, stderr=subprocess.STDOUT,
                                        start_new_session=True)
            deadline = time.time() + 180
            while "Ray runtime started" not in (root / "head.log").read_text() and proc.poll() is None:
                if time.time() > deadline:
                    pytest.fail("the Ray head did not start:\n" + (root / "head.log").read_text()[-2000:])
                time.sleep(0.5)
            if proc.poll() is None:
                break
            kill_processes_of(root)
        else:
            pytest.fail("the Ray head did not start:\n" + (root / "head.log").read_text()[-2000:])
        yield {"address": f"127.0.0.1:{port}", "head": head}
    finally:
        if proc is not None and proc.poll() is None:
            # SIGTERM to `ray start` alone: it drains its node and stops its processes in a second or two. Sent to
            # the whole group it also stops the GCS first, and the head then waits 30 s for the GCS to drain.
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
        kill_processes_of(root)
        shutil.rmtree(root, ignore_errors=True)


def test_a_sweep_joined_from_another_folder_with_relative_paths_stores_every_sample_there(
        cluster, model_dirs, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    shutil.copytree(model_dirs("llava"), tmp_path / "models" / "tiny-a")
    write_shapes(tmp_path / "data", 5, seed=3)
    args = ["sweep", "--address", cluster["address"], "--models", "models/tiny-a",
            "--datasets", "shapes,pointqa:data/shapes.json", "--shards", "2", "--limit", "5", "--batch-size", "2",
            "--store", "out/study.duckdb", "--cpus-per-task", "1"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    with Store(tmp_path / "out" / "study.duckdb", read_only=True) as db:
        runs = db.runs().set_index("name")
        assert set(runs.index) == {"tiny-a-shapes", "tiny-a-pointqa"}
        assert (runs["status"] == "done").all() and (runs["n_samples"] == 5).all()
        assert len(db.head_stats("tiny-a-pointqa")) == 5 * 3 * 4
    assert list(cluster["head"].iterdir()) == []


def test_on_ray_a_killed_worker_is_retried_without_duplicates_and_a_bad_model_fails_with_its_reason(
        cluster, model_dirs, tmp_path):
    store = tmp_path / "v.duckdb"
    runs = plan([RunConfig(model=str(model_dirs("llava")), limit=8, batch_size=2, name="tiny"),
                 RunConfig(model=str(tmp_path / "no-such"), name="missing")])
    events, killed = [], []

    def on_event(event):
        events.append(event)
        if event.kind == "open" and event.run == "tiny" and not killed:
            killed.append(int(event.text.split(",")[0].split(":")[1]))
        elif event.kind == "progress" and event.run == "tiny" and len(killed) == 1:
            os.kill(killed[0], signal.SIGKILL)
            killed.append(True)

    result = run_sweep(runs, store, address=cluster["address"], cpus_per_task=2, retries=1, on_event=on_event)
    tasks = result.tasks.set_index("run")
    assert tasks.loc["tiny", "status"] == "done" and tasks.loc["missing", "status"] == "failed"
    assert "does not exist" in tasks.loc["missing", "error"]
    failures = sorted((e.run, e.text) for e in events if e.kind == "failure")
    assert [run for run, _ in failures] == ["missing", "tiny"] and "trying again" in failures[1][1]
    with Store(store, read_only=True) as db:
        assert db.run("tiny")["status"] == "done" and db.run("tiny")["n_samples"] == 8
        assert len(db.head_stats("tiny")) == 8 * 3 * 4
