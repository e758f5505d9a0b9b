"""Per-sample error prediction (`vheads predict errors`) on a large synthetic store: time to read the figures, fit
the three predictors by grouped 5-fold cross-validation (penalty chosen by inner cross-validation), bootstrap the
AUROCs and store the predictions.

The store holds one run of `--n` samples x 6 layers x 16 heads (the demo model's grid) written through
`Store.add_batch`, with the error log-odds rising with the W of one visual head; writing it is not timed. Timed:
`analysis.errors.predict_runs` for `--heads visual` (the default) and `--heads all`, each with the label-shuffle
check and 1,000 bootstrap draws, as the command runs them. The issue's target: 10,000 samples in under 10 s.

NumPy's BLAS runs on `--blas-threads` threads (default 1, set before NumPy loads): these matrices are small, and on
a busy 2-core machine OpenBLAS's spinning threads made one fit 15 times slower.

    python benchmarks/predict.py [--n 10000] [--blas-threads 1] [--boot 1000]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

LAYERS, HEADS = 6, 16


def build(path: Path, n: int, seed: int = 0) -> None:
    """One finished run of `n` synthetic samples (4 visual heads in layer 0; errors follow the W of head 0.0)."""
    import numpy as np

    from vheads.store import Store

    rng = np.random.default_rng(seed)
    with Store(path) as db:
        run = db.start_run("synthetic", model="synthetic", family="llava", dataset="shapes", split="test",
                           layers=LAYERS, heads=HEADS, readout="prompt", ablation="none", config={})
        for lo in range(0, n, 1000):
            m = min(1000, n - lo)
            w = rng.uniform(0, 0.1, size=(m, LAYERS, HEADS))
            w[:, 0, :4] = rng.uniform(0.3, 0.9, size=(m, 4))
            c = rng.uniform(0, 1, size=w.shape)
            region = w * rng.uniform(0, 1, size=w.shape)
            pointing = (rng.random(w.shape) < 0.5).astype(float)
            right = rng.random(m) < 1 / (1 + np.exp(-6 * (w[:, 0, 0] - 0.6)))
            first = np.clip(0.6 + 0.2 * right + rng.normal(0, 0.2, m), 0.01, 0.99)
            rows = [{"sample_id": f"s{lo + i:06d}", "question": "how many?", "prediction": "2",
                     "answer": "2" if right[i] else "3", "correct": bool(right[i]), "image_tokens": 36,
                     "region_tokens": 4, "meta": {}, "first_token_prob": float(first[i]),
                     "mean_logprob": float(np.log(first[i]))} for i in range(m)]
            db.add_batch(run, rows, w, c, region, 1 - w, np.zeros_like(w), pointing=pointing)
        db.finish_run(run, accuracy=None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=10000, help="samples in the synthetic run")
    parser.add_argument("--boot", type=int, default=1000, help="bootstrap draws (the command's default)")
    parser.add_argument("--blas-threads", type=int, default=1, help="NumPy BLAS threads (0: OpenBLAS's default); "
                        "the README figure used 1")
    args = parser.parse_args()
    if args.blas_threads:
        for name in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
            os.environ[name] = str(args.blas_threads)
    if "numpy" in sys.modules and args.blas_threads:
        raise SystemExit("NumPy was loaded before the thread count could be set")
    from vheads.analysis.errors import predict_runs
    from vheads.store import Store

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "bench.duckdb"
        began = time.time()
        build(path, args.n)
        print(f"synthetic store: {args.n} samples x {LAYERS * HEADS} heads written in {time.time() - began:.1f} s; "
              f"cpu, {args.blas_threads or 'default'} BLAS thread(s), {args.boot} bootstrap draws")
        print("| heads | features per fold | read + fit + bootstrap + store | AUROC heads | confidence | both | "
              "shuffled |")
        print("|---|---:|---:|---:|---:|---:|---:|")
        for head_set in ("visual", "all"):
            with Store(path) as db:
                began = time.time()
                result = predict_runs(db, ["synthetic"], head_set=head_set, n_boot=args.boot)[0]
                seconds = time.time() - began
            auroc = {name: f"{value:.3f}" for name, (value, _, _) in result.auroc.items()}
            print(f"| {head_set} | {4 * max(result.heads_used)} | {seconds:.1f} s | {auroc['heads']} | "
                  f"{auroc['confidence']} | {auroc['both']} | {result.shuffled[0]:.3f} |")
    print("target: visual heads under 10 s for 10,000 samples x 96 heads")


if __name__ == "__main__":
    main()
