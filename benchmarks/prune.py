"""What image-blind heads, flow-blind heads and FastV save, against the plain SDPA model in the same run.

A random Llama language model with LLaVA-1.5-7B's attention geometry (hidden 4096, 32 heads, MLP 11008; as many
layers as you ask for, 2 by default) reads prompts of `PREFIX` text tokens, N image tokens (576, 2,880 and 8,000 by
default: LLaVA-1.5's one picture, LLaVA-1.6's picture and 4 tiles, a long video-like prompt) and `QUESTION` text
tokens, in one prefill, then takes `--decode` steps (16) of one token each with a KV cache. Methods:
  plain        sdpa, no vheads context
  image-blind  `capture.ablate(mode="image-blind")`: every head except a share of each layer's heads (a fixed
               random choice per layer, `--seed`) loses the image keys, prefill and decode
  flow-blind   the same heads, but only their text rows lose the image keys (image rows attend as usual)
  fastv        `capture.fastv(layer=K, keep=R)`: from layer K on only the R share of image tokens stays
Each vheads method runs on the pruned KV cache its context offers (`ablate.cache()`, `fastv.cache()`): no image keys
and values for key/value heads whose query heads are all blind, none of FastV's dropped tokens from layer K on; with
it the blind heads' attention runs on the text keys alone. `--masked` shares also run image-blind on the plain cache,
where the attention masks the image keys instead of skipping them.
Columns: prefill seconds (median of `--repeats`), decode ms per token (median), KV-cache bytes held after the last
step (total, and at image positions: `capture.cache_bytes`), peak memory (CPU: peak resident set size over the loaded
model; CUDA: max_memory_allocated over the loaded model) and attention FLOPs counted analytically (QK^T and AV over
the pairs of query row and key each method computes, prefill and decode; FastV as FastV computes it, the dropped
tokens gone from layer K on), each with its ratio to plain. Each (image tokens, method) runs in its own process, so
peak memory is clean; the process also times plain, alternating with the method, and the time ratios are to those
runs (a shared machine's load drifts between processes). Image tokens are given as counts, not as capture.py's prompt
lengths: 8,000 is no whole number of 576-token grids.

    python benchmarks/prune.py [--images 576,2880,8000] [--layers 2] [--decode 16] [--repeats 3] [--threads 1]
                               [--device cpu|cuda] [--dtype float32|bfloat16] [--json FILE]

The defaults are the README table's conditions: CPU, fp32, one torch thread (0 threads: torch's own choice).
"""

from __future__ import annotations

import argparse
import json
import math
import random
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field

IMAGE_ID = 5
PREFIX, QUESTION = 5, 15  # text tokens before and after the image (20 in all, as in benchmarks/capture.py)
MODES = ("plain", "image-blind", "flow-blind", "fastv")
TARGETS = {"image KV": 0.12, "KV total": 0.25, "decode": 1.0, "prefill": 1.05}  # at 10% of heads keeping the image


@dataclass(frozen=True)
class Geometry:
    """The language model's shape: LLaVA-1.5-7B's attention geometry by default."""

    layers: int = 2
    hidden: int = 4096
    heads: int = 32
    kv_heads: int = 32
    mlp: int = 11008

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads


@dataclass(frozen=True)
class Layout:
    """A prompt: `prefix` text tokens, `images` image tokens, `question` text tokens."""

    images: int
    prefix: int = PREFIX
    question: int = QUESTION

    @property
    def length(self) -> int:
        return self.prefix + self.images + self.question


@dataclass(frozen=True)
class Method:
    """One measured configuration: `mode`, the share of heads keeping the image (blind modes) or FastV's
    layer K and kept share R."""

    mode: str
    share: float = 1.0
    layer: int = 0
    masked: bool = False  # the plain KV cache, not the pruned one: the attention masks the image instead of skipping it

    @property
    def label(self) -> str:
        if self.mode == "fastv":
            return f"fastv K={self.layer} R={self.share:g}"
        return f"{self.mode}, masked" if self.masked else self.mode


@dataclass
class Cost:
    """Analytic cost of one method on one prompt: attention FLOPs and KV-cache bytes after the last decode step."""

    flops: int
    kv_bytes: int
    image_kv_bytes: int
    keeping: dict[int, int] = field(default_factory=dict)  # per layer, the query heads that keep the image


# ---- pure counting ----------------------------------------------------------------------------------------


def heads_keeping(heads: int, share: float) -> int:
    """How many of a layer's `heads` keep the image at `share` (rounded: 10% of 32 -> 3, 5% of 32 -> 2)."""
    if not 0 <= share <= 1:
        raise ValueError(f"a share of heads must lie in [0, 1], not {share}")
    return min(heads, round(share * heads))


def kept_heads(geometry: Geometry, share: float, seed: int) -> dict[int, list[int]]:
    """Per layer, the query heads that keep the image: a fixed random choice of `heads_keeping` heads per layer."""
    k = heads_keeping(geometry.heads, share)
    return {layer: sorted(random.Random(seed * 1_000_003 + layer).sample(range(geometry.heads), k))
            for layer in range(geometry.layers)}


def blind_heads(geometry: Geometry, kept: dict[int, list[int]]) -> list[tuple[int, int]]:
    """The (layer, head) pairs that do not keep the image."""
    return [(layer, head) for layer in range(geometry.layers) for head in range(geometry.heads)
            if head not in kept[layer]]


def pairs(layout: Layout, decode: int, sees: str) -> int:
    """(query row, key) pairs one head computes over the prefill and `decode` steps, causally: `sees` is `all`
    (every key), `text` (no image key, every row: image-blind) or `flow` (text rows without image keys, image rows
    as usual: flow-blind)."""
    if sees not in ("all", "text", "flow"):
        raise ValueError(f"unknown key set {sees!r}")
    n, m, p = layout.length, layout.images, layout.prefix
    full = n * (n + 1) // 2 + sum(n + t + 1 for t in range(decode))
    if sees == "all":
        return full
    before = p * (p + 1) // 2  # rows before the image see text only anyway
    image_rows = m * p if sees == "text" else sum(range(p + 1, p + m + 1))
    after = sum(i + 1 - m for i in range(p + m, n)) + sum(n + t + 1 - m for t in range(decode))
    return before + image_rows + after


def element_bytes(dtype: str) -> int:
    """Bytes of one element of `dtype` (float32, bfloat16, float16)."""
    sizes = {"float32": 4, "bfloat16": 2, "float16": 2}
    if dtype not in sizes:
        raise ValueError(f"unknown dtype {dtype!r}; expected one of {', '.join(sizes)}")
    return sizes[dtype]


def text_kv_bytes(geometry: Geometry, layout: Layout, decode: int, dtype: str) -> int:
    """KV bytes of the text positions (prompt text and decoded tokens), which every method holds in full."""
    positions = layout.prefix + layout.question + decode
    return 2 * positions * geometry.kv_heads * geometry.head_dim * element_bytes(dtype) * geometry.layers


def cost(method: Method, geometry: Geometry, layout: Layout, decode: int, dtype: str, seed: int = 0) -> Cost:
    """Attention FLOPs (QK^T and AV: 4 * head_dim per pair) and KV bytes of `method`, as the method defines them:
    blind heads skip the image keys and a key/value head drops the image when all its query heads are blind
    (grouped-query attention); FastV's layers from K on run on the kept image tokens only."""
    from vheads.heads import image_kv_heads

    d = geometry.head_dim
    per_position = 2 * d * element_bytes(dtype)  # a key and a value of one key/value head
    image_kv = 0
    flops = 0
    keeping: dict[int, int] = {}
    if method.mode in ("plain", "fastv"):
        for layer in range(geometry.layers):
            images = layout.images
            if method.mode == "fastv" and layer >= method.layer:
                images = math.ceil(method.share * layout.images)
            seen = Layout(images, layout.prefix, layout.question)
            flops += 4 * d * geometry.heads * pairs(seen, decode, "all")
            image_kv += images * geometry.kv_heads * per_position
            keeping[layer] = geometry.heads
    elif method.mode in ("image-blind", "flow-blind"):
        kept = kept_heads(geometry, method.share, seed)
        kv_kept = image_kv_heads(blind_heads(geometry, kept), geometry.heads, geometry.kv_heads,
                                 range(geometry.layers))
        sees = "text" if method.mode == "image-blind" else "flow"
        for layer in range(geometry.layers):
            k = len(kept[layer])
            flops += 4 * d * (k * pairs(layout, decode, "all") + (geometry.heads - k) * pairs(layout, decode, sees))
            image_kv += layout.images * len(kv_kept[layer]) * per_position
            keeping[layer] = k
    else:
        raise ValueError(f"unknown method {method.mode!r}; expected one of {', '.join(MODES)}")
    text = text_kv_bytes(geometry, layout, decode, dtype)
    return Cost(flops, text + image_kv, image_kv, keeping)


def methods_for(modes: list[str], shares: list[float], fastv_layer: int, fastv_keeps: list[float],
                masked_shares: tuple[float, ...] = ()) -> list[Method]:
    """The measured configurations, plain first; `masked_shares`: image-blind also on the plain cache (masked)."""
    out = [Method("plain")] if "plain" in modes else []
    for mode in ("image-blind", "flow-blind"):
        if mode in modes:
            out += [Method(mode, share) for share in shares]
    if "image-blind" in modes:
        out += [Method("image-blind", share, masked=True) for share in masked_shares]
    if "fastv" in modes:
        out += [Method("fastv", keep, fastv_layer) for keep in fastv_keeps]
    return out


# ---- measuring --------------------------------------------------------------------------------------------


def build(geometry: Geometry, device: str, dtype: str, attn: str, positions: int):
    """The random language model (seed 0), for prompts of up to `positions` tokens."""
    import torch
    from transformers import LlamaConfig, LlamaModel

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=1024, hidden_size=geometry.hidden, intermediate_size=geometry.mlp,
                         num_hidden_layers=geometry.layers, num_attention_heads=geometry.heads,
                         num_key_value_heads=geometry.kv_heads, max_position_embeddings=max(4096, positions),
                         attn_implementation=attn)
    return LlamaModel(config).to(device=device, dtype=getattr(torch, dtype)).eval()


def inputs_for(layout: Layout, decode: int, device: str):
    """The prompt's input_ids (text, `IMAGE_ID` x images, text) and the `decode` text tokens fed one by one."""
    import torch

    generator = torch.Generator().manual_seed(layout.images)
    ids = torch.randint(10, 1000, (1, layout.length + decode), generator=generator)
    ids[0, layout.prefix:layout.prefix + layout.images] = IMAGE_ID
    return ids[:, :layout.length].to(device), ids[:, layout.length:].to(device)


def method_context(model, method: Method, geometry: Geometry, seed: int):
    """The vheads context of `method` on `model` (None for plain); ValueError when this vheads lacks it."""
    from vheads import capture

    if method.mode == "plain":
        return None
    if method.mode == "fastv":
        if not hasattr(capture, "fastv"):
            raise ValueError("this vheads has no capture.fastv")
        return capture.fastv(model, layer=method.layer, keep=method.share, image_token_id=IMAGE_ID)
    if method.mode not in capture.ABLATION_MODES:
        raise ValueError(f"this vheads has no {method.mode} ablation")
    heads = blind_heads(geometry, kept_heads(geometry, method.share, seed))
    return capture.ablate(model, heads, mode=method.mode, image_token_id=IMAGE_ID)


def held_bytes(cache, image) -> dict[str, int]:
    """KV bytes a cache holds, in all and at the `image` positions ([batch, prompt] bool): vheads' own count where it
    has one (`capture.cache_bytes`), else the keys and values of the cache's layers (total only)."""
    from vheads import capture

    counter = getattr(capture, "cache_bytes", None)
    if counter is not None:
        return dict(counter(cache, image))
    total = 0
    for layer in cache.layers:
        for tensor in (getattr(layer, "keys", None), getattr(layer, "values", None)):
            if tensor is not None and hasattr(tensor, "nbytes"):
                total += int(tensor.nbytes)
    return {"total": total}


def measure(method: Method, geometry: Geometry, images: int, decode: int, repeats: int, device: str, dtype: str,
            attn: str, seed: int) -> dict:
    """Prefill and decode time, KV bytes and peak memory of one (method, image tokens) in this process."""
    import inspect
    from contextlib import nullcontext

    import torch
    from transformers import DynamicCache

    torch.set_grad_enabled(False)
    layout = Layout(images)
    model = build(geometry, device, dtype, attn, layout.length + decode)
    prompt, steps = inputs_for(layout, decode, device)
    cache_kw = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"

    def sync():
        if device == "cuda":
            torch.cuda.synchronize()

    def once(method: Method) -> tuple[float, float, dict, str]:
        ctx = method_context(model, method, geometry, seed)
        with ctx if ctx is not None else nullcontext():
            offered = None if method.masked else getattr(ctx, "cache", None)
            cache = offered() if offered is not None else DynamicCache(config=model.config)
            kind = "vheads" if offered is not None else "plain"
            sync()
            start = time.perf_counter()
            model(input_ids=prompt, use_cache=True, **{cache_kw: cache})
            sync()
            prefilled = time.perf_counter()
            for step in range(decode):
                model(input_ids=steps[:, step:step + 1], use_cache=True, **{cache_kw: cache})
            sync()
            done = time.perf_counter()
            held = held_bytes(cache, prompt == IMAGE_ID)
        return prefilled - start, (done - prefilled) / max(decode, 1), held, kind

    base_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base_mb = torch.cuda.memory_allocated() / 2**20
    once(method)  # warm-up (kernels, allocator), and the method's peak memory before plain runs here
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if device == "cuda":
        peak_mb = torch.cuda.max_memory_allocated() / 2**20
    plain = Method("plain")
    runs, paired = [], []
    for repeat in range(repeats):  # plain alternates with the method, first and second by turns
        order = [method] if method == plain else [method, plain] if repeat % 2 == 0 else [plain, method]
        for which in order:
            (runs if which == method else paired).append(once(which))
    held = runs[-1][2]
    text = text_kv_bytes(geometry, layout, decode, dtype)
    analytic = cost(method, geometry, layout, decode, dtype, seed)
    return {"images": images, "method": method.label, "mode": method.mode, "share": method.share,
            "masked": method.masked,
            "fastv_layer": method.layer if method.mode == "fastv" else None,
            "keeping": analytic.keeping, "prefill_s": statistics.median(r[0] for r in runs),
            "decode_ms": 1000 * statistics.median(r[1] for r in runs), "kv_bytes": held["total"],
            "image_kv_bytes": held.get("image", held["total"] - text), "cache": runs[-1][3], "held": held,
            "peak_over_model_mb": peak_mb - base_mb, "model_mb": base_mb, "flops": analytic.flops,
            "analytic_kv_bytes": analytic.kv_bytes, "analytic_image_kv_bytes": analytic.image_kv_bytes,
            "prefill_runs": [r[0] for r in runs], "decode_runs_ms": [1000 * r[1] for r in runs],
            "paired_prefill_s": statistics.median(r[0] for r in paired) if paired else None,
            "paired_decode_ms": 1000 * statistics.median(r[1] for r in paired) if paired else None}


# ---- the table --------------------------------------------------------------------------------------------


def keeping_label(row: dict, heads: int) -> str:
    """'3/32' per layer for blind methods, 'all' for plain and FastV."""
    counts = set(row["keeping"].values())
    if row["mode"] in ("plain", "fastv") or counts == {heads}:
        return "all"
    return f"{'/'.join(map(str, sorted(counts)))}/{heads}"


def ratio(value: float, base: float) -> str:
    return f"{value / base:.2f}" if base else "-"


def time_ratio(row: dict, plain: dict | None, key: str) -> float | None:
    """`row[key]` (prefill_s, decode_ms) over plain's: the plain runs timed in the same process, alternating with
    the method's (robust to a machine whose load changes), else plain's own row."""
    base = row.get(f"paired_{key}") or (plain or {}).get(key)
    return row[key] / base if base else None


def table(rows: list[dict], heads: int) -> list[str]:
    """The README table: one line per (image tokens, method), ratios to plain at the same image tokens (times: to
    the plain runs alternating with the method's in its process)."""
    lines = ["| image tokens | method | heads keeping the image | prefill s | x plain | decode ms/token | x plain | "
             "KV MB | x plain | image KV MB | x plain | peak over model MB | x plain | attention GFLOP | x plain |",
             "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for row in rows:
        plain = next((r for r in rows if r["images"] == row["images"] and r["mode"] == "plain"), None)
        base = plain or {key: 0 for key in row}
        lines.append(
            f"| {row['images']} | {row['method']} | {keeping_label(row, heads)} | {row['prefill_s']:.3f} | "
            f"{time_ratio(row, plain, 'prefill_s'):.2f} | {row['decode_ms']:.1f} | "
            f"{time_ratio(row, plain, 'decode_ms'):.2f} | {row['kv_bytes'] / 2**20:.1f} | "
            f"{ratio(row['kv_bytes'], base['kv_bytes'])} | {row['image_kv_bytes'] / 2**20:.1f} | "
            f"{ratio(row['image_kv_bytes'], base['image_kv_bytes'])} | {row['peak_over_model_mb']:.0f} | "
            f"{ratio(row['peak_over_model_mb'], base['peak_over_model_mb'])} | {row['flops'] / 1e9:.1f} | "
            f"{ratio(row['flops'], base['flops'])} |")
    return lines


def target_lines(rows: list[dict], share: float = 0.1) -> list[str]:
    """Per image-token count, whether image-blind at `share` of heads keeping the image meets the issue's targets:
    image KV <= 0.12x plain, KV total <= 0.25x, decode <= 1.0x, prefill <= 1.05x."""
    lines = []
    for images in sorted({r["images"] for r in rows}):
        plain = next((r for r in rows if r["images"] == images and r["mode"] == "plain"), None)
        blind = next((r for r in rows if r["images"] == images and r["mode"] == "image-blind"
                      and r["share"] == share and not r["masked"]), None)
        if plain is None or blind is None:
            continue
        figures = {"image KV": blind["image_kv_bytes"] / plain["image_kv_bytes"],
                   "KV total": blind["kv_bytes"] / plain["kv_bytes"],
                   "decode": time_ratio(blind, plain, "decode_ms"),
                   "prefill": time_ratio(blind, plain, "prefill_s")}
        parts = [f"{name} {value:.2f}x ({'met' if value <= TARGETS[name] else 'missed'}, target <= {TARGETS[name]}x)"
                 for name, value in figures.items()]
        lines.append(f"- {images} image tokens, image-blind with {share:.0%} of heads keeping the image: "
                     + "; ".join(parts))
    return lines


def floats(text: str, option: str, low: float, high: float, low_open: bool = False) -> list[float]:
    """'1,0.25' -> [1.0, 0.25], each within [low, high] ((low, high] when `low_open`); ValueError naming the
    option."""
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"{option} {text}: not a comma-separated list of numbers") from None
    for value in values:
        if value > high or value < low or (low_open and value == low):
            side = "(" if low_open else "["
            raise ValueError(f"{option} {text}: {value:g} lies outside {side}{low:g}, {high:g}]")
    return values


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", default="576,2880,8000", help="image tokens per prompt, comma-separated")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=0, help="key/value heads (0: as many as --heads)")
    parser.add_argument("--mlp", type=int, default=11008)
    parser.add_argument("--decode", type=int, default=16, help="decode steps after the prefill")
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats after one warm-up (median)")
    parser.add_argument("--modes", default=",".join(MODES), help="methods to measure: " + ", ".join(MODES))
    parser.add_argument("--shares", default="1,0.25,0.1,0.05", help="shares of heads keeping the image")
    parser.add_argument("--fastv-layer", type=int, default=0, help="FastV's K (0: 2, or 1 below 3 layers)")
    parser.add_argument("--fastv-keep", default="0.5,0.25", help="FastV's kept shares R")
    parser.add_argument("--masked", default="0.1", help="shares at which image-blind also runs masked, on the plain KV "
                        "cache instead of its pruned one ('': none)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the heads that keep the image")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--attn", default="sdpa", help="kernel of every method: sdpa or flash_attention_2")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (0: torch's default); the README "
                        "table used 1")
    parser.add_argument("--in-process", action="store_true", help="measure every configuration in this process "
                        "(quick; peak memory then not per configuration)")
    parser.add_argument("--json", help="also write the rows to this file")
    parser.add_argument("--rows", help="print the tables of rows stored by --json in these files (comma-separated) "
                        "instead of measuring")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.rows:
        try:
            reprint([name for name in args.rows.split(",") if name])
        except (OSError, ValueError, KeyError) as error:
            parser.error(f"--rows {args.rows}: {error}")
        return
    geometry = Geometry(args.layers, args.hidden, args.heads, args.kv_heads or args.heads, args.mlp)
    if args.one:
        if args.threads:
            import torch

            torch.set_num_threads(args.threads)
        spec = json.loads(args.one)
        method, images = Method(**spec["method"]), spec["images"]
        print(json.dumps(measure(method, geometry, images, args.decode, args.repeats, args.device, args.dtype,
                                 args.attn, args.seed)))
        return
    try:
        images = [int(v) for v in args.images.split(",") if v.strip()]
        if not images or min(images) < 1:
            raise ValueError(f"--images {args.images}: give positive image-token counts")
        modes = [m for m in args.modes.split(",") if m]
        unknown = sorted(set(modes) - set(MODES))
        if unknown:
            raise ValueError(f"--modes {args.modes}: unknown {', '.join(unknown)}; expected {', '.join(MODES)}")
        if args.layers < 1 or args.heads < 1 or args.hidden % args.heads or geometry.heads % geometry.kv_heads:
            raise ValueError(f"--layers {args.layers} --hidden {args.hidden} --heads {args.heads} --kv-heads "
                             f"{geometry.kv_heads}: hidden must split into heads, heads into key/value groups")
        shares = floats(args.shares, "--shares", 0, 1)
        keeps = floats(args.fastv_keep, "--fastv-keep", 0, 1, low_open=True)
        masked = floats(args.masked, "--masked", 0, 1)
        fastv_layer = args.fastv_layer or (2 if args.layers > 2 else 1)
        if "fastv" in modes and not 1 <= fastv_layer < args.layers:
            raise ValueError(f"--fastv-layer {fastv_layer}: FastV's K lies in [1, layers) and --layers is "
                             f"{args.layers}; leave fastv out of --modes")
    except ValueError as error:
        parser.error(str(error))
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    methods = methods_for(modes, shares, fastv_layer, keeps, tuple(masked))
    rows = []
    for count in images:
        for method in methods:
            if args.in_process:
                try:
                    rows.append(measure(method, geometry, count, args.decode, args.repeats, args.device, args.dtype,
                                        args.attn, args.seed))
                except ValueError as error:
                    print(f"  {method.label}: skipped, {error}", file=sys.stderr)
                    continue
            else:
                spec = json.dumps({"method": asdict(method), "images": count})
                cmd = [sys.executable, __file__, "--one", spec, "--layers", str(args.layers), "--hidden",
                       str(args.hidden), "--heads", str(args.heads), "--kv-heads", str(geometry.kv_heads), "--mlp",
                       str(args.mlp), "--decode", str(args.decode), "--repeats", str(args.repeats), "--device",
                       args.device, "--dtype", args.dtype, "--attn", args.attn, "--threads", str(args.threads),
                       "--seed", str(args.seed)]
                out = subprocess.run(cmd, capture_output=True, text=True)
                if out.returncode:
                    last = (out.stderr.strip().splitlines() or ["no output"])[-1]
                    print(f"  {method.label} at {count} image tokens: skipped, {last}", file=sys.stderr)
                    continue
                rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
            row = rows[-1]
            print(f"  {count:5d} image tokens, {method.label:12s} {method.share:4g}: prefill {row['prefill_s']:.3f} s,"
                  f" decode {row['decode_ms']:.1f} ms/token ({row['cache']} cache)", file=sys.stderr)
    settings = {"geometry": asdict(geometry), "dtype": args.dtype, "device": args.device, "threads": args.threads,
                "decode": args.decode, "repeats": args.repeats, "fastv_layer": fastv_layer}
    print("\n".join(report(settings, rows)))
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({**settings, "rows": rows}, handle, indent=1)


def report(settings: dict, rows: list[dict]) -> list[str]:
    """The conditions line, the table, notes on caches that hold more than their method needs, and the targets."""
    geometry = Geometry(**settings["geometry"])
    threads = settings["threads"]
    threads = f", {threads} torch thread(s)" if threads else ", torch's default threads"
    lines = [f"\n{geometry.layers} layers, hidden {geometry.hidden}, {geometry.heads} heads ({geometry.kv_heads} "
             f"key/value), MLP {geometry.mlp}, {settings['dtype']} on {settings['device']}{threads}; {PREFIX} + image "
             f"+ {QUESTION} text tokens, {settings['decode']} decode steps, median of {settings['repeats']}\n",
             *table(rows, geometry.heads)]
    for row in rows:
        plain = next((r for r in rows if r["images"] == row["images"] and r["mode"] == "plain"), None)
        if plain and row["analytic_image_kv_bytes"] != row["image_kv_bytes"]:
            lines.append(f"- {row['images']} image tokens, {row['method']}: its cache holds the image KV of plain "
                         f"({row['cache']} cache); the method as defined needs "
                         f"{row['analytic_image_kv_bytes'] / plain['image_kv_bytes']:.2f}x plain's image KV")
    checks = target_lines(rows)
    if checks:
        lines += ["\nTargets (image-blind, 10% of heads keeping the image, against plain):", *checks]
    return lines


def reprint(files: list[str]) -> None:
    """The report of rows stored by `--json`, the files measured under the same conditions in one table."""
    groups: dict[str, tuple[dict, list[dict]]] = {}
    for name in files:
        with open(name) as handle:
            stored = json.load(handle)
        rows = stored.pop("rows")
        groups.setdefault(json.dumps(stored, sort_keys=True), (stored, []))[1].extend(rows)
    for settings, rows in groups.values():
        print("\n".join(report(settings, rows)))

if __name__ == "__main__":
    main()
