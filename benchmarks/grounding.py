"""Grounding from visual heads on the demo model: pointing, IoU and acc50 of head sets chosen by each selector.

Two runs of the model (default: the shipped demo) on ShapesQA object questions shown without a box
(`--question-type obj --prompt-style none`): one on the `val` split, whose figures choose the heads, and one on
held-out `test` questions, which are grounded (`vheads ground --heads-from`), so no head set is chosen on the
samples it is scored on (`--choose-on test` chooses on the grounded run itself, as `vheads ground` does alone).
Head sets: localization:K, pointing:K, top:K and random:K with three seeds. Prints a markdown table and the
issue's check: localization pointing >= 0.6 and >= 2x the mean of the random sets.

    python benchmarks/grounding.py [--model PATH] [--limit 300] [--choose-limit 300] [--k 4] [--sigma 0.5]
                                   [--choose-on val|test] [--threads 1]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from vheads.analysis.grounding import ground
from vheads.models import load
from vheads.pipeline.config import RunConfig
from vheads.pipeline.run import run


def fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="model folder or hub id (default: the shipped demo)")
    parser.add_argument("--limit", type=int, default=300, help="held-out test questions grounded")
    parser.add_argument("--choose-limit", type=int, default=300, help="val questions whose figures choose the heads")
    parser.add_argument("--choose-on", choices=("val", "test"), default="val")
    parser.add_argument("--k", type=int, default=4, help="heads per set")
    parser.add_argument("--sigma", type=float, default=0.5, help="smoothing in token cells (vheads ground --sigma)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (0: torch's default); the README "
                        "table used 1")
    parser.add_argument("--store", default=None, help="keep the runs in this store (default: a temporary one)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    began = time.time()
    loaded = load(args.model)
    with tempfile.TemporaryDirectory() as tmp:
        store = args.store or str(Path(tmp) / "grounding.duckdb")
        base = RunConfig(model=args.model, question_type="obj", prompt_style="none", store=store, batch_size=16)
        test = run(replace(base, limit=args.limit, split="test"), loaded=loaded)
        chooser = test.name
        if args.choose_on == "val":
            chooser = run(replace(base, limit=args.choose_limit, split="val"), loaded=loaded).name
        k = args.k
        selectors = [f"localization:{k}", f"pointing:{k}", f"top:{k}"] + [f"random:{k}:{seed}" for seed in range(3)]
        results = ground(store, test.name, selectors, heads_from=chooser, loaded=loaded, sigma_cells=args.sigma)
    print(f"model {loaded.name}; ShapesQA obj questions, no box; heads chosen on {args.choose_on} "
          f"({args.choose_limit if args.choose_on == 'val' else args.limit} questions), grounded on "
          f"{results[0].n} held-out test questions; sigma {args.sigma} cells; {torch.get_num_threads()} torch "
          f"thread(s); {time.time() - began:.0f} s; run accuracy {fmt(test.accuracy)}\n")
    print("| heads | chosen | pointing | IoU | acc50 |")
    print("|---|---|---:|---:|---:|")
    for r in results:
        print(f"| `{r.selector}` | {', '.join(f'{a}.{b}' for a, b in r.heads)} | {fmt(r.pointing)} | {fmt(r.iou)} | "
              f"{fmt(r.acc50)} |")
    random = [r for r in results if r.selector.startswith("random")]
    mean = {key: float(np.mean([getattr(r, key) for r in random])) for key in ("pointing", "iou", "acc50")}
    print(f"| random:{k}, mean of 3 seeds | | {fmt(mean['pointing'])} | {fmt(mean['iou'])} | {fmt(mean['acc50'])} |")
    local = results[0].pointing or 0.0
    ratio = local / mean["pointing"] if mean["pointing"] else float("inf")
    verdict = "met" if local >= 0.6 and ratio >= 2 else "missed"
    print(f"\nlocalization:{k} pointing {local:.3f} = {ratio:.2f}x the random mean {mean['pointing']:.3f} "
          f"(target >= 0.6 and >= 2x): {verdict}")


if __name__ == "__main__":
    main()
