"""A demo sweep of 4 runs x 2 shards three ways: on a local Ray, with --no-ray, and as the same `vheads run`s one
after another (each its own process, as a user would type them).

The 4 runs are the demo model on held-out ShapesQA with readout prompt / generated x prompt style visual /
plain, `--n` questions each. Every side uses one torch thread per worker (Ray: `--cpus-per-task 1`, so
`--cpus` workers side by side); the shares are of the side's wall time: starting Ray (connecting the driver),
and loading models and data (worker-seconds, summed over the workers).

    python benchmarks/sweep.py [--n 32] [--cpus 2]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from vheads.pipeline.config import RunConfig
from vheads.sweep.driver import plan, run_sweep

VARIANTS = [{"readout": r, "prompt_style": p} for r in ("prompt", "generated") for p in ("visual", "plain")]


def configs(n: int) -> list[RunConfig]:
    """The sweep's 4 runs."""
    return [RunConfig(limit=n, batch_size=8, **v) for v in VARIANTS]


def sweep_side(n: int, cpus: int, local: bool) -> dict[str, float]:
    """Wall seconds of the sweep and its timing parts."""
    with tempfile.TemporaryDirectory() as tmp:
        began = time.perf_counter()
        result = run_sweep(plan(configs(n)), Path(tmp) / "s.duckdb", shards=2, local=local, num_cpus=cpus)
        wall = time.perf_counter() - began
        assert result.ok, result.tasks.to_string()
    return {"wall": wall, "start": result.timing["start"], "load": result.timing["load"]}


def runs_side(n: int) -> dict[str, float]:
    """Wall seconds of the same runs as `vheads run` processes, 2 shards each, one after another."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    vheads = str(Path(sys.executable).parent / "vheads")
    with tempfile.TemporaryDirectory() as tmp:
        began = time.perf_counter()
        for v in VARIANTS:
            for k in (1, 2):
                subprocess.run([vheads, "run", "--limit", str(n), "--batch-size", "8", "--readout", v["readout"],
                                "--prompt-style", v["prompt_style"], "--shard", f"{k}/2",
                                "--store", str(Path(tmp) / "r.duckdb")], check=True, env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        return {"wall": time.perf_counter() - began}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=32)
    parser.add_argument("--cpus", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(f"4 runs x 2 shards, {args.n} questions a run, 1 torch thread per worker, {args.cpus} Ray CPUs")
    for label, measure in (("local Ray", lambda: sweep_side(args.n, args.cpus, local=False)),
                           ("--no-ray", lambda: sweep_side(args.n, args.cpus, local=True)),
                           ("vheads run x 8", lambda: runs_side(args.n))):
        t = measure()
        parts = "".join(f", {k} {t[k]:.1f} s ({t[k] / t['wall']:.0%})" for k in ("start", "load") if k in t)
        print(f"{label:16s} wall {t['wall']:.1f} s{parts}", flush=True)


if __name__ == "__main__":
    main()
