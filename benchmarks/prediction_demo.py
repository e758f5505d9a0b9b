"""What head figures predict on the demo model: the README's Prediction tables.

Starts from the store `vheads demo` wrote (copied, never changed): its runs `demo-none` and `demo-plain` (300
held-out ShapesQA questions without the box / with the box as text, accuracy about 0.55) give the per-sample AUROCs
(`vheads predict errors`, visual heads and all heads, each run and both pooled). Then it adds one run per prompt
style x question type x ablation (clean, the top-4 and top-8 visual heads of `demo`, 8 random heads; `--limit`
questions with seed 1) and estimates `demo-none`'s accuracy from the other runs (`vheads predict accuracy`, head and
stage features), leave-one-run-out over them, against the baseline and the confidence-only estimate; the same on the
demo's own runs alone.

    python benchmarks/prediction_demo.py [--demo-store vheads-demo/vheads-demo.duckdb] [--limit 150] [--threads 1]
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import tempfile
import time
from pathlib import Path


def fmt(value: float) -> str:
    return f"{value:.3f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--demo-store", default="vheads-demo/vheads-demo.duckdb", help="the store `vheads demo` "
                        "wrote (copied)")
    parser.add_argument("--limit", type=int, default=150, help="questions per added run")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads and NumPy BLAS threads (0: their "
                        "defaults); the README tables used 1")
    parser.add_argument("--boot", type=int, default=1000, help="bootstrap draws")
    parser.add_argument("--keep", default=None, help="keep the extended store here (default: a temporary copy)")
    args = parser.parse_args()
    if args.threads:
        os.environ["OPENBLAS_NUM_THREADS"] = str(args.threads)
    import torch

    from vheads.analysis.accuracy import estimate_accuracy
    from vheads.analysis.errors import predict_runs
    from vheads.analysis.ranking import head_table, top_heads
    from vheads.models import load
    from vheads.pipeline.config import RunConfig
    from vheads.pipeline.run import run
    from vheads.store import Store

    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        store = Path(args.keep) if args.keep else Path(tmp) / "study.duckdb"
        shutil.copyfile(args.demo_store, store)
        print(f"cpu, {args.threads or 'default'} thread(s); {args.boot} bootstrap draws\n")
        print("| runs | heads | n (wrong) | AUROC heads | confidence | both | heads - confidence | shuffled |")
        print("|---|---|---:|---:|---:|---:|---:|---:|")
        with Store(store) as db:
            for head_set in ("visual", "all"):
                for runs, pooled in ((["demo-none"], False), (["demo-plain"], False),
                                     (["demo-none", "demo-plain"], True)):
                    for r in predict_runs(db, runs, head_set=head_set, pooled=pooled, n_boot=args.boot):
                        cells = [f"{fmt(v)} [{fmt(lo)}, {fmt(hi)}]" for v, lo, hi in
                                 (r.auroc[name] for name in ("heads", "confidence", "both"))]
                        d = r.difference
                        print(f"| {r.label} | {head_set} ({min(r.heads_used)}-{max(r.heads_used)}) | "
                              f"{len(r.data.wrong)} ({int(r.data.wrong.sum())}) | {' | '.join(cells)} | "
                              f"{d[0]:+.3f} [{d[1]:+.3f}, {d[2]:+.3f}] | {fmt(r.shuffled[0])} |")
            demo_runs = [str(n) for n in db.runs()["name"]]
            top = top_heads(head_table(db, "demo"), 8)
        layers_heads = [(layer, head) for layer in range(6) for head in range(16)]
        ablations = {"clean": [], "top4": top[:4], "top8": top[:8],
                     "rand8": random.Random(0).sample(layers_heads, 8)}
        began = time.time()
        loaded = load(None)
        for style in ("visual", "plain", "none"):
            for qtype in ("general", "obj", "super"):
                for label, heads in ablations.items():
                    run(RunConfig(limit=args.limit, seed=1, prompt_style=style, question_type=qtype, ablate=heads,
                                  store=str(store), name=f"study-{style}-{qtype}-{label}", batch_size=16),
                        loaded=loaded)
        print(f"\n36 runs of {args.limit} questions added in {time.time() - began:.0f} s\n")
        print("| training runs | features | demo-none estimate (true) | LORO error heads | baseline | confidence | "
              "heads, accuracies shuffled |")
        print("|---|---|---:|---:|---:|---:|---:|")
        with Store(store) as db:
            truth = db.run("demo-none")["accuracy"]
            for label, train in (("the demo's own", [n for n in demo_runs if n != "demo-none"]),
                                 ("demo + 36 added", None)):
                for features in ("heads", "stages"):
                    e = estimate_accuracy(db, "demo-none", train, features=features, save=False)
                    print(f"| {len(e.train)} ({label}) | {features} | {fmt(e.estimates['heads'])} ({fmt(truth)}) | "
                          f"{fmt(e.mae['heads'])} | {fmt(e.mae['baseline'])} | {fmt(e.mae['confidence'])} | "
                          f"{fmt(e.shuffled_mae)} |")


if __name__ == "__main__":
    main()
