"""Speed and memory of vheads capture against a plain forward and eager `output_attentions=True`.

A random Llama language model with LLaVA-1.5-7B's attention geometry (hidden 4096, 32 heads, MLP 11008;
as many layers as you ask for) runs one prefill at about 700 and about 2,900 tokens (LLaVA-1.5 and
LLaVA-1.6 anyres lengths), with 576 / 2,880 image tokens; `--lengths` takes any others (`image_tokens`).
Three modes:
  plain    sdpa forward, nothing recorded
  capture  sdpa forward inside `HeadRecorder` (per-head W, C, region, text, sink of the last row)
  eager    eager forward with output_attentions=True, reduced to the same figures afterwards
Each (mode, length) runs in its own process so peak memory is clean: on CPU the peak resident set size
(total, and the increase over the loaded model), on CUDA `max_memory_allocated`.

    python benchmarks/capture.py [--layers 2] [--repeats 3] [--device cpu|cuda] [--dtype float32|bfloat16]
                                 [--attn sdpa|flash_attention_2] [--threads 1]

The defaults are the README table's conditions: CPU, fp32, one torch thread (0 threads: torch's own choice).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

IMAGE_ID = 5
GRID = 576  # image tokens of one LLaVA picture (24 x 24 patches); LLaVA-1.6 anyres adds one grid per tile
PREFIX, MIN_TEXT = 5, 20  # text tokens before the image; text tokens a prompt keeps at least


def image_tokens(length: int) -> int:
    """Image tokens in a prompt of `length`: as many whole grids as leave `MIN_TEXT` text tokens (700 -> 576,
    LLaVA-1.5's one picture; 2,900 -> 2,880, LLaVA-1.6's picture and 4 tiles; 8,192 -> 8,064), or, below one
    grid, all but `MIN_TEXT`."""
    room = length - MIN_TEXT
    if room < 1:
        raise ValueError(f"a prompt of {length} tokens leaves no room for an image: give more than {MIN_TEXT}")
    return GRID * (room // GRID) or room


def build(layers: int, device: str, dtype: str, attn: str, positions: int = 4096):
    """The random language model, for prompts of up to `positions` tokens."""
    import torch
    from transformers import LlamaConfig, LlamaModel

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=1024, hidden_size=4096, intermediate_size=11008, num_hidden_layers=layers,
                         num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=max(4096, positions),
                         attn_implementation=attn)
    model = LlamaModel(config).to(device=device, dtype=getattr(torch, dtype)).eval()
    return model


def inputs_for(length: int, device: str):
    """input_ids with `image_tokens(length)` image tokens after a `PREFIX`-token prefix, the rest text."""
    import torch

    ids = torch.randint(10, 1000, (1, length), generator=torch.Generator().manual_seed(length))
    ids[0, PREFIX:PREFIX + image_tokens(length)] = IMAGE_ID
    return ids.to(device)


def eager_figures(attentions, ids):
    """The same figures as the recorder, from full eager attention matrices (what users do by hand today)."""
    import torch

    from vheads import metrics

    image = (ids == IMAGE_ID)[:, None]
    sink = torch.zeros_like(image)
    sink[..., 0] = True
    text = ~image & ~sink
    rows = torch.stack([a[:, :, -1].float() for a in attentions], dim=1)
    return metrics.attention_figures(rows, image[:, None], None, text[:, None], sink[:, None])


def measure(mode: str, length: int, layers: int, repeats: int, device: str, dtype: str, attn: str) -> dict:
    """Time and peak memory of one (mode, length) in this process."""
    import torch

    from vheads.capture import HeadRecorder

    torch.set_grad_enabled(False)
    model = build(layers, device, dtype, "eager" if mode == "eager" else attn, positions=length)
    ids = inputs_for(length, device)

    def once():
        if mode == "plain":
            model(input_ids=ids)
        elif mode == "capture":
            with HeadRecorder(model, image_token_id=IMAGE_ID, eos_token_ids=[]) as rec:
                model(input_ids=ids)
            rec.result()
        else:
            out = model(input_ids=ids, output_attentions=True)
            {k: v.cpu() for k, v in eager_figures(out.attentions, ids).items()}
        if device == "cuda":
            torch.cuda.synchronize()

    base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base_gpu = torch.cuda.memory_allocated() / 2**20
    once()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        once()
        times.append(time.perf_counter() - start)
    result = {"mode": mode, "tokens": length, "seconds": min(times), "peak_mb": resource.getrusage(
        resource.RUSAGE_SELF).ru_maxrss / 1024, "model_mb": base_rss}
    if device == "cuda":
        result["peak_mb"] = torch.cuda.max_memory_allocated() / 2**20
        result["model_mb"] = base_gpu
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--lengths", default="700,2900")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (0: torch's default); the README "
                        "table used 1")
    parser.add_argument("--attn", default="sdpa", help="kernel of plain and capture: sdpa or flash_attention_2")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        if args.threads:
            import torch

            torch.set_num_threads(args.threads)
        mode, length = args.one.split(":")
        print(json.dumps(measure(mode, int(length), args.layers, args.repeats, args.device, args.dtype, args.attn)))
        return
    try:
        lengths = [int(v) for v in args.lengths.split(",")]
        for length in lengths:
            image_tokens(length)
    except ValueError as error:
        parser.error(f"--lengths {args.lengths}: {error}")
    rows = []
    for length in lengths:
        for mode in ("plain", "capture", "eager"):
            cmd = [sys.executable, __file__, "--one", f"{mode}:{length}", "--layers", str(args.layers),
                   "--repeats", str(args.repeats), "--device", args.device, "--dtype", args.dtype,
                   "--threads", str(args.threads), "--attn", args.attn]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True)
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(f"  {mode:8s} {length:5d} tokens: {rows[-1]['seconds']:.3f} s", file=sys.stderr)
    threads = f", {args.threads} torch thread(s)" if args.threads else ", torch's default threads"
    print(f"\n{args.layers} layers, hidden 4096, 32 heads, {args.dtype} on {args.device}{threads}\n")
    print("| tokens | mode | time (s) | x plain | peak mem (MB) | x plain | over model (MB) |")
    print("|---:|---|---:|---:|---:|---:|---:|")
    for row in rows:
        plain = next(r for r in rows if r["tokens"] == row["tokens"] and r["mode"] == "plain")
        over = row["peak_mb"] - row["model_mb"]
        print(f"| {row['tokens']} | {row['mode']} | {row['seconds']:.3f} | {row['seconds'] / plain['seconds']:.2f} | "
              f"{row['peak_mb']:.0f} | {row['peak_mb'] / plain['peak_mb']:.3f} | {over:.0f} |")


if __name__ == "__main__":
    main()
