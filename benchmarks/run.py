"""End-to-end `vheads run` throughput against plain `model.generate` on the same batches.

Both sides load the same model once, build the same left-padded batches of held-out ShapesQA (images,
prompts, processor) and generate greedily with the same `max_new_tokens`. The plain side stops there;
the vheads side is the real pipeline (`vheads.pipeline.run`): capture of every head, region masks,
scoring and DuckDB writes. Overhead = vheads time / plain time - 1 (target <= 20%).

    python benchmarks/run.py [--model PATH] [--n 300] [--batch-size 16] [--repeats 9] [--threads 1]
                             [--device cpu] [--dtype float32]

The defaults are the README table's conditions: one torch thread, the CPU, fp32 (0 threads: torch's own choice).

The sides alternate (ABBA...) so that drift of the machine's speed hits both; the overhead is given best
against best and as the median of the paired ratios.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from vheads.data import load_dataset
from vheads.models import load
from vheads.pipeline.config import RunConfig
from vheads.pipeline.run import run


def plain_generate(loaded, samples, batch_size: int, max_new_tokens: int) -> float:
    """Seconds to image-load, encode and generate every batch with no capture."""
    adapter = loaded.adapter
    start = time.perf_counter()
    for i in range(0, len(samples), batch_size):
        chunk = samples[i:i + batch_size]
        images = [[s.image()] for s in chunk]
        inputs = adapter.encode([adapter.prompt(s.text) for s in chunk], images).to(loaded.device)
        with torch.inference_mode():
            out = loaded.model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False,
                                        pad_token_id=adapter.tokenizer.pad_token_id)
        adapter.decode(out, inputs["input_ids"].shape[1])
    return time.perf_counter() - start


def vheads_run(loaded, dataset, batch_size: int, max_new_tokens: int) -> float:
    """Seconds for the full pipeline into a fresh store."""
    with tempfile.TemporaryDirectory() as tmp:
        config = RunConfig(store=str(Path(tmp) / "bench.duckdb"), name="bench", batch_size=batch_size,
                           max_new_tokens=max_new_tokens)
        start = time.perf_counter()
        run(config, loaded=loaded, dataset=dataset)
        return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None)
    parser.add_argument("--n", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (0: torch's default); the README "
                        "table used 1")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (the README table: cpu)")
    parser.add_argument("--dtype", default="float32", help="float32, bfloat16 or float16 (the README table: float32)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.set_grad_enabled(False)
    loaded = load(args.model, dtype=args.dtype, device=args.device)
    dataset = load_dataset("shapes", limit=args.n)
    plain_generate(loaded, dataset.samples[: args.batch_size], args.batch_size, args.max_new_tokens)
    vheads_run(loaded, load_dataset("shapes", limit=args.batch_size), args.batch_size, args.max_new_tokens)
    plain, ours = [], []
    for i in range(args.repeats):
        sides = [("plain", plain), ("vheads", ours)]
        for side, times in sides if i % 2 == 0 else sides[::-1]:
            if side == "plain":
                times.append(plain_generate(loaded, dataset.samples, args.batch_size, args.max_new_tokens))
            else:
                times.append(vheads_run(loaded, dataset, args.batch_size, args.max_new_tokens))
    ratios = [v / p for p, v in zip(plain, ours, strict=True)]
    print(f"model {Path(loaded.name).name}, {args.n} held-out ShapesQA questions, batch {args.batch_size}, "
          f"{args.device}, {args.dtype}, {torch.get_num_threads()} torch thread(s), {args.repeats} alternating repeats")
    print("| side | best s | median s | samples/s (median) |")
    print("|---|---:|---:|---:|")
    for label, times in (("plain generate", plain), ("vheads run (capture + scoring + store)", ours)):
        print(f"| {label} | {min(times):.2f} | {statistics.median(times):.2f} | "
              f"{args.n / statistics.median(times):.1f} |")
    print(f"\noverhead: {100 * (min(ours) / min(plain) - 1):+.1f}% best vs best, "
          f"{100 * (statistics.median(ratios) - 1):+.1f}% median of paired repeats")


if __name__ == "__main__":
    main()
