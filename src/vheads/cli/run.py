"""`vheads run`: one model over one dataset into the store, with a live progress line and a summary at the end."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import typer

from vheads.cli.common import (
    LIMIT_HELP,
    MAX_PIXELS_HELP,
    MODEL_HELP,
    STORE_HELP,
    check_choice,
    errors,
    explicit_options,
    parse_stages_option,
    print_heads,
    setup_logging,
)
from vheads.cli.output import ProgressView, say
from vheads.data.registry import list_datasets

DATASET_HELP = f"Dataset loader: {', '.join(list_datasets())} (see `vheads data list`)."


def run(
    ctx: typer.Context,
    model: str = typer.Option(None, "--model", "-m", help=MODEL_HELP),
    dataset: str = typer.Option("shapes", "--dataset", "-d", help=DATASET_HELP),
    data: str = typer.Option(None, "--data", help="The benchmark file or folder (default: none; not needed for "
                             "shapes)."),
    images: str = typer.Option(None, "--images", help="Folder that relative image paths start from (default: the "
                               "data file's folder); a relative path may not leave it, absolute paths are used as "
                               "given."),
    split: str = typer.Option(None, "--split", help="Split (default: the loader's; POPE: adversarial/popular/random; "
                              "shapes: test/train)."),
    question_type: str = typer.Option(None, "--question-type", help="PointQA / ShapesQA: general, obj or super "
                                      "(default: all types)."),
    prompt_style: str = typer.Option(None, "--prompt-style", help="Box prompt: visual (drawn), plain (text "
                                     "coordinates) or none (default: the loader's)."),
    limit: int = typer.Option(None, "--limit", "-n", help=LIMIT_HELP),
    max_pixels: int = typer.Option(50_000_000, "--max-pixels", min=0, help=MAX_PIXELS_HELP),
    batch_size: int = typer.Option(8, "--batch-size", "-b", min=1, help="Samples per batch (halved on OOM)."),
    max_new_tokens: int = typer.Option(8, "--max-new-tokens", min=1, help="Answer length limit (greedy)."),
    readout: str = typer.Option("prompt", "--readout", help="Query rows measured: prompt (last prompt position), "
                                "first-generated, or generated (all generated tokens, averaged)."),
    ablate_heads: str = typer.Option(None, "--ablate", help="Heads to ablate (default: none): a LAYER.HEAD list "
                                     "(3.1,4.7) or a selector: top:K, late:K, pointing:K, region:K, cost:K (rank the "
                                     "heads of --from; cost: by a stored `vheads ablate --each`), random:K[:seed], "
                                     "stage:early|mid|late."),
    from_run: str = typer.Option(None, "--from", help="Run whose head ranking top:K / late:K select from "
                                 "(default: none)."),
    ablation: str = typer.Option("zero", "--ablation", help="zero (output zeroed), uniform (uniform weights), "
                                 "image-blind (image keys leave the head's softmax) or flow-blind (only text rows "
                                 "lose them)."),
    fastv_layer: int = typer.Option(None, "--fastv-layer", help="FastV: layers before this one see every image "
                                    "token; from it on only the --fastv-keep share the last prompt row attended to "
                                    "most (every head)."),
    fastv_keep: float = typer.Option(None, "--fastv-keep", help="FastV: the share of image tokens kept, in (0, 1]."),
    store: str = typer.Option("vheads.duckdb", "--store", help=STORE_HELP),
    name: str = typer.Option(None, "--name", help="Run name (default: model-dataset-split, numbered if taken)."),
    shard: str = typer.Option(None, "--shard", help="K/N: run the K-th of N contiguous shards into its own file "
                              "beside the store; fold them in with `vheads merge` (default: the whole dataset)."),
    dtype: str = typer.Option("auto", "--dtype", help="auto (bf16 on GPU, fp32 on CPU), float32, bfloat16, float16."),
    device: str = typer.Option("auto", "--device", help="auto (all GPUs via accelerate), cpu, cuda, cuda:N."),
    attn: str = typer.Option("sdpa", "--attn", help="Kernel the model runs: sdpa, eager, flash_attention_2."),
    resume: bool = typer.Option(False, "--resume", help="Continue the run of that --name with its stored options, "
                                "skipping stored samples; an option given that differs from the run is refused."),
    seed: int = typer.Option(0, "--seed", help="Seed for --limit sampling."),
    trust_remote_code: bool = typer.Option(False, "--trust-remote-code", help="Allow the model's own code."),
    preset: str = typer.Option(None, "--preset", help="paper: the reference code's choices (readout "
                               "first-generated, max-new-tokens 128, its stage boundaries); options given win."),
    stages: str = typer.Option(None, "--stages", help="A,B: mid starts at layer A, late at layer B (default: "
                               "thirds); stored with the run for heads, selectors, compare and report."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="More log lines."),
) -> None:
    """Run a model over a dataset: answer (greedy), score, and store every sample's per-head figures."""
    setup_logging(verbose)
    from vheads.analysis.selectors import run_option_heads
    from vheads.models import check_device
    from vheads.pipeline.config import RunConfig, parse_shard
    from vheads.pipeline.run import run as run_pipeline

    with errors():
        check_device(device)
        bounds = parse_stages_option(stages)
        config = RunConfig(model=model, dataset=dataset, data=data, images=images, split=split,
                           question_type=question_type, prompt_style=prompt_style, limit=limit,
                           batch_size=batch_size, max_new_tokens=max_new_tokens,
                           readout=check_choice(readout, "readout"),
                           ablate=run_option_heads(ablate_heads, from_run, store, model, trust_remote_code, bounds,
                                                   ablation),
                           ablation=check_choice(ablation, "ablation"), store=store,
                           name=name, shard=parse_shard(shard), dtype=dtype, device=device, attn=attn, resume=resume,
                           seed=seed, trust_remote_code=trust_remote_code, stages=bounds, preset=preset,
                           explicit=explicit_options(ctx),
                           tags={"ablate": ablate_heads, "from_run": from_run} if from_run else {},
                           max_pixels=max_pixels or None, fastv_layer=fastv_layer, fastv_keep=fastv_keep)
        config.check()
        with ProgressView() as view:
            start, update = run_progress(view)
            view.status(f"loading the model ({model or 'embedded demo'}) and the data ({dataset}) ...")
            summary = run_pipeline(config, progress=update, start=start)
        print_summary(summary)


def run_progress(view: ProgressView, label: str = "run") -> tuple[Callable[[int, int], None],
                                                                 Callable[[int, int, int, int], None]]:
    """`start(done, total)` and `update(done, total, correct, scored)` of a run, shown on `view` with the rate of
    this session and the accuracy over the scored samples."""
    began: dict[str, float] = {}

    def start(done: int, total: int) -> None:
        import time

        began.update(t=time.monotonic(), done=done)
        view.update(label, done, total, "")

    def update(done: int, total: int, correct: int, scored: int) -> None:
        import time

        new = done - began.get("done", 0)
        rate = new / max(time.monotonic() - began.get("t", time.monotonic()), 1e-9)
        accuracy = f"acc {correct / scored:.3f}" if scored else "acc n/a (no answer to score)"
        view.update(label, done, total, f"{rate:.1f} samples/s, {accuracy}")

    return start, update


def print_summary(summary: Any) -> None:
    """The end-of-run summary: accuracy per question type, skipped samples, top-10 heads, where it is stored."""
    from vheads.analysis.ranking import head_table, no_readout_hint
    from vheads.store import Store

    acc = "n/a" if summary.accuracy is None else f"{summary.accuracy:.3f}"
    say(f"\nrun {summary.name}  samples {summary.samples}  accuracy {acc}  ({summary.seconds:.1f} s)")
    if summary.by_type:
        say("  by question type: " + ", ".join(f"{k} {v:.3f}" for k, v in sorted(summary.by_type.items())))
    for metric, values in summary.extra.items():
        values = dict(values)
        counted, left_out = values.pop("n", None), int(values.pop("left_out", 0))
        over = f" over {int(counted)} items" if counted is not None else ""
        note = f", {left_out} left out (no label it counts)" if left_out else ""
        say(f"  {metric}{over}{note}: " + ", ".join(f"{k} {v:.3f}" for k, v in values.items()))
    if summary.long_prompts:
        say(f"  {summary.long_prompts} prompt(s) longer than the model's {summary.max_positions} positions "
            "(processed; marked over_max_positions in samples.meta)")
    for note in summary.notes:
        say(f"  {note}")
    skipped = sum(summary.skipped.values())
    if skipped:
        say(f"  skipped {skipped}: " + ", ".join(f"{n} {why}" for why, n in summary.skipped.items())
            + " (--verbose lists every one)")
    with Store(summary.store, read_only=True) as store:
        table = head_table(store, summary.run_id)
    hint = no_readout_hint(table)
    if hint:
        say(f"  {hint}")
    print_heads(table.head(10), f"top-10 heads (K = {table.attrs['k']}, scored over {table.attrs['scored']} samples)")
    say(f"stored in {summary.store} as run {summary.name}")


def register(app: typer.Typer) -> None:
    """Add `run` to the vheads app."""
    app.command()(run)
