"""`vheads run`: generate answers over a dataset, score them, and store every sample's head figures."""

from __future__ import annotations

import logging
import signal
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vheads import metrics
from vheads import settings as run_settings
from vheads.capture import HeadFigures, HeadRecorder, ablate, attention_layer_indices
from vheads.data import BadSample, Dataset, Sample, load_dataset, score
from vheads.data.images import DEFAULT_MAX_PIXELS
from vheads.data.skips import SkipLog
from vheads.models import GeometryError, Loaded, TokenGrid, load
from vheads.store import RunHandle, Store, StoreError, shard_path
from vheads.writer import BatchWriter

log = logging.getLogger("vheads.run")


class Interrupted(Exception):
    """The run was stopped by SIGINT / SIGTERM; finished batches are stored and the run can be resumed."""


@dataclass
class RunConfig:
    """Everything that defines a run (the command-line options of `vheads run`).

    `stages`: the first mid and the first late layer (None: thirds). `preset`: `paper` sets the reference code's
    choices (`settings.PRESETS`). `explicit`: the options the user gave explicitly, which --resume checks against
    the stored run and `ablate --from` keeps; None means every field that differs from its default.
    """

    model: str | None = None
    dataset: str = "shapes"
    data: str | None = None
    images: str | None = None
    split: str | None = None
    question_type: str | None = None
    prompt_style: str | None = None
    limit: int | None = None
    batch_size: int = 8
    max_new_tokens: int = 8
    readout: str = "prompt"
    ablate: list[tuple[int, int]] = field(default_factory=list)
    ablation: str = "zero"
    store: str = "vheads.duckdb"
    name: str | None = None
    shard: tuple[int, int] | None = None
    dtype: str = "auto"
    device: str = "auto"
    attn: str = "sdpa"
    resume: bool = False
    seed: int = 0
    trust_remote_code: bool = False
    sweep: str | None = None
    tags: dict[str, Any] = field(default_factory=dict)
    max_pixels: int | None = DEFAULT_MAX_PIXELS
    stages: tuple[int, int] | None = None
    preset: str | None = None
    explicit: tuple[str, ...] | None = None

    def load_dataset(self) -> Dataset:
        """The dataset these options name."""
        return load_dataset(self.dataset, data=self.data, images=self.images, split=self.split,
                            question_type=self.question_type, prompt_style=self.prompt_style, limit=self.limit,
                            seed=self.seed, max_pixels=self.max_pixels)

    def load_model(self) -> Loaded:
        """The model these options name, loaded for vheads."""
        return load(self.model, dtype=self.dtype, device=self.device, attn=self.attn,
                    trust_remote_code=self.trust_remote_code)

    def store_path(self) -> Path:
        """The store file this run writes (a shard writes its own file beside the store)."""
        path = Path(self.store)
        return shard_path(path, *self.shard) if self.shard else path


@dataclass
class RunSummary:
    """What a finished (or interrupted) run reports."""

    name: str
    run_id: int
    store: str
    samples: int
    correct: int
    accuracy: float | None
    by_type: dict[str, float]
    skipped: dict[str, int]
    status: str
    seconds: float
    extra: dict[str, Any] = field(default_factory=dict)
    long_prompts: int = 0
    max_positions: int | None = None
    notes: list[str] = field(default_factory=list)


def check_config(config: RunConfig) -> None:
    """ValueError naming the first option whose value is out of range."""
    for name, value, low in (("limit", config.limit, 1), ("batch-size", config.batch_size, 1),
                             ("max-new-tokens", config.max_new_tokens, 1), ("seed", config.seed, 0)):
        if value is not None and value < low:
            raise ValueError(f"--{name} {value}: must be at least {low}")
    if config.readout == "first-generated" and config.max_new_tokens < 2:
        raise ValueError("--readout first-generated reads the row of the second answer token: --max-new-tokens "
                         f"must be at least 2, got {config.max_new_tokens}")


def prepared(config: RunConfig, store: Store) -> RunConfig:
    """The config a run really uses: absolute paths, the preset applied, and with --resume the stored run's
    settings for every option not given explicitly (a conflicting one is a StoreError)."""
    config = replace(config, data=run_settings.absolute(config.data), images=run_settings.absolute(config.images),
                     model=run_settings.absolute(config.model))
    if config.resume:
        row = resume_target(store, config)
        if row is not None:
            stored = row["config"] or {}
            clash = run_settings.conflicts(config, stored)
            if clash:
                raise StoreError(f"cannot resume run {row['name']}: {'; '.join(clash)}; drop the option to continue "
                                 "it, or start a new --name")
            skip = run_settings.EXECUTION + run_settings.NOT_STORED + run_settings.DERIVED
            keep = [n for n in stored if n not in skip]
            config = replace(run_settings.inherit(config, stored, keep), name=row["name"])
    config = run_settings.with_preset(config)
    check_config(config)
    return config


def resume_target(store: Store, config: RunConfig) -> dict[str, Any] | None:
    """The run --resume continues: the one named, else the latest of this model and dataset (None: a new run)."""
    runs = store.runs()
    if config.name:
        return store.run(config.name) if config.name in set(runs["name"]) else None
    prefix = f"{Path(config.model).name if config.model else 'demo'}-{config.dataset}"
    matches = runs[runs["name"].map(lambda n: n == prefix or str(n).startswith(prefix + "-"))]
    return None if matches.empty else store.run(str(matches.sort_values("run_id").iloc[-1]["name"]))


def parse_heads(text: str | None) -> list[tuple[int, int]]:
    """'3.1,4.7' -> [(3, 1), (4, 7)]; raises ValueError naming the bad item."""
    heads = []
    for item in (text or "").replace(" ", "").split(","):
        if not item:
            continue
        parts = item.split(".")
        if len(parts) != 2 or not all(p.isdigit() for p in parts):
            raise ValueError(f"--ablate: {item!r} is not LAYER.HEAD (e.g. 3.1)")
        heads.append((int(parts[0]), int(parts[1])))
    return heads


def parse_shard(text: str | None) -> tuple[int, int] | None:
    """'2/4' -> (2, 4), the second of four contiguous shards."""
    if not text:
        return None
    try:
        k, n = (int(v) for v in text.split("/"))
    except ValueError:
        raise ValueError(f"--shard {text!r} is not K/N (e.g. 2/4)") from None
    if not 1 <= k <= n:
        raise ValueError(f"--shard {text!r}: K must be between 1 and N")
    return k, n




def check_heads(heads: Sequence[tuple[int, int]], layers: int, per_layer: int,
                attention_layers: Sequence[int] | None = None) -> None:
    """Raise ValueError naming the `--ablate` heads that the model does not have (or that sit in a layer
    without softmax attention)."""
    bad = [f"{layer}.{head}" for layer, head in heads if not (0 <= layer < layers and 0 <= head < per_layer)]
    if bad:
        raise ValueError(f"--ablate: heads {', '.join(bad)} do not exist ({layers} layers x {per_layer} heads)")
    linear = [f"{layer}.{head}" for layer, head in heads
              if attention_layers is not None and layer not in attention_layers]
    if linear:
        raise ValueError(f"--ablate: heads {', '.join(linear)} are in layers without softmax attention "
                         f"(attention layers: {', '.join(map(str, attention_layers))})")


def head_grid(loaded: Loaded, ablated: Sequence[tuple[int, int]]) -> tuple[int, int, list[int]]:
    """The model's layers, heads per layer and softmax-attention layers, after checking that `ablated` names
    heads it has (ValueError otherwise)."""
    text = loaded.model.config.get_text_config()
    layers, heads = int(text.num_hidden_layers), int(text.num_attention_heads)
    attention_layers = attention_layer_indices(loaded.model)
    check_heads(ablated, layers, heads, attention_layers)
    return layers, heads, attention_layers


def stored_run_settings(config: RunConfig, layers: int, attention_layers: list[int]) -> dict[str, Any]:
    """What `runs.config` keeps for a run: its settings with the stages fixed for the model's depth, and the
    attention layers read off the model (see `settings.DERIVED`)."""
    return {**run_settings.stored_settings(with_stages(config, layers)), "attention_layers": attention_layers}


def shard_samples(samples: Sequence[Sample], shard: tuple[int, int] | None) -> list[Sample]:
    """The k-th of n contiguous chunks of ceil(len/n) samples (LLaVA's --num-chunks / --chunk-idx)."""
    if shard is None:
        return list(samples)
    k, n = shard
    size = -(-len(samples) // n)
    return list(samples[(k - 1) * size: k * size])


def base_name(model_label: str, config: RunConfig, split: str | None) -> str:
    """`<model>-<dataset>[-<split>][-<readout>][-<ablation>K]`: the name a run of these options gets by default."""
    parts = [model_label, config.dataset] + ([split] if split else [])
    if config.readout != "prompt":
        parts.append(config.readout)
    if config.ablate:
        parts.append(f"{config.ablation}{len(config.ablate)}")
    return "-".join(parts)


def default_name(store: Store, config: RunConfig, model_name: str, split: str | None) -> str:
    """`base_name` of the run and the digest of its defining settings (`settings.digest`), so runs with other
    data, limit, seed or options never share a name; numbered while that name is taken."""
    base = f"{base_name(Path(model_name).name or 'model', config, split)}-{run_settings.digest(config)}"
    taken = set(store.runs()["name"])
    name, i = base, 2
    while name in taken:
        name, i = f"{base}-{i}", i + 1
    return name


@contextmanager
def interrupt_guard() -> Iterator[None]:
    """Turn SIGTERM into KeyboardInterrupt for the duration, so both stop the run the same clean way."""
    def raise_interrupt(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    try:
        previous = signal.signal(signal.SIGTERM, raise_interrupt)
    except ValueError:  # not the main thread
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def is_oom(exc: BaseException) -> bool:
    """Out of memory on the GPU or the CPU."""
    if isinstance(exc, MemoryError) or exc.__class__.__name__ == "OutOfMemoryError":
        return True
    return isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()


@dataclass
class BatchLayout:
    """A batch's image tokens on the picture: the asked-about box's tokens, the tokens on any target instance
    ([batch, seq] bool or None without boxes) and each row's `TokenGrid` (None when the geometry is unknown)."""

    region: torch.Tensor | None
    target: torch.Tensor | None
    grids: list[TokenGrid] | None


class Runner:
    """Runs batches of samples through a loaded model with capture (and ablation) on."""

    def __init__(self, loaded: Loaded, config: RunConfig):
        self.loaded = loaded
        self.config = config
        self.no_regions: str | None = None
        text = loaded.model.config.get_text_config()
        self.max_positions = getattr(text, "max_position_embeddings", None)
        self.long_warned = False

    def too_long(self, lengths: np.ndarray) -> np.ndarray:
        """Which prompts of a batch are longer than the model's maximum positions (warned once per run)."""
        over = lengths > self.max_positions if self.max_positions else np.zeros(len(lengths), dtype=bool)
        if over.any() and not self.long_warned:
            log.warning("a prompt of %d tokens is longer than the model's %d positions; such samples are processed "
                        "and counted in the summary", int(lengths.max()), self.max_positions)
            self.long_warned = True
        return over

    def prepare(self, samples: Sequence[Sample]) -> tuple[list[Sample], list[Any], list[tuple[Sample, str]]]:
        """Load each sample's image; the ones that fail are returned with the reason."""
        good, images, bad = [], [], []
        for sample in samples:
            try:
                images.append(sample.image())
                good.append(sample)
            except BadSample as exc:
                bad.append((sample, str(exc) or "unreadable image"))
            except (OSError, ValueError) as exc:
                bad.append((sample, f"unreadable image ({type(exc).__name__})"))
        return good, images, bad

    def layout(self, images: list[list[Any]], inputs: Any, samples: Sequence[Sample]) -> BatchLayout:
        """Where the batch's image tokens lie: the region and target masks and each row's token grid, or none of
        them when the family's geometry is unknown (said once per run)."""
        adapter = self.loaded.adapter
        try:
            row_grids = adapter.row_grids(images, inputs)
        except GeometryError as exc:
            if self.no_regions is None:
                self.no_regions = f"no region, pointing or spatial-entropy figures: {exc}"
                log.warning("%s", self.no_regions)
            return BatchLayout(None, None, None)
        boxes = [[] if s.box is None else [s.box] for s in samples]
        targets = [s.targets() for s in samples]
        region = adapter.boxes_mask(row_grids, inputs, boxes) if any(boxes) else None
        target = adapter.boxes_mask(row_grids, inputs, targets) if any(targets) else None
        return BatchLayout(region, target, [TokenGrid.concat(list(per_image)) for per_image in row_grids])

    def run_batch(self, samples: Sequence[Sample], images: Sequence[Any]
                  ) -> tuple[list[str], Any, np.ndarray, np.ndarray]:
        """Generate answers for one batch and record its head figures; returns answers, figures, region sizes and
        which prompts are longer than the model's maximum positions."""
        adapter = self.loaded.adapter
        nested = [[img] for img in images]
        prompts = [adapter.prompt(s.text) for s in samples]
        inputs = adapter.encode(prompts, nested)
        layout = self.layout(nested, inputs, samples)
        region = layout.region
        region_tokens = np.zeros(len(samples), dtype=np.int64) if region is None else region.sum(1).numpy()
        lengths = (inputs["attention_mask"].sum(1) if "attention_mask" in inputs else
                   torch.full((len(samples),), inputs["input_ids"].shape[1]))
        too_long = self.too_long(lengths.numpy())
        model = self.loaded.model
        inputs = inputs.to(self.loaded.device)
        if "pixel_values" in inputs and inputs["pixel_values"].is_floating_point():
            inputs["pixel_values"] = inputs["pixel_values"].to(model.dtype)
        with ExitStack() as stack:
            stack.enter_context(torch.inference_mode())
            if self.config.ablate:
                stack.enter_context(ablate(model, self.config.ablate, self.config.ablation))
            recorder = stack.enter_context(HeadRecorder(model, self.config.readout, region_mask=region,
                                                        target_mask=layout.target, grids=layout.grids))
            output = model.generate(**inputs, max_new_tokens=self.config.max_new_tokens, do_sample=False,
                                    pad_token_id=adapter.tokenizer.pad_token_id)
        answers = adapter.decode(output, inputs["input_ids"].shape[1])
        return answers, recorder.result(), region_tokens, too_long

    def run_adaptive(self, samples: Sequence[Sample], images: Sequence[Any]) -> Iterator[tuple[int, int, Any]]:
        """Run a batch, halving it on out-of-memory until it fits (a batch is never dropped)."""
        size = len(samples)
        start = 0
        while start < len(samples):
            chunk = slice(start, start + size)
            try:
                result = self.run_batch(samples[chunk], images[chunk])
            except Exception as exc:  # noqa: BLE001 - only out-of-memory is retried
                if not is_oom(exc) or size == 1:
                    raise
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
                size = max(1, size // 2)
                log.warning("out of memory: retrying with batch size %d", size)
                continue
            yield start, start + len(samples[chunk]), result
            start += size


@dataclass
class Computed:
    """One computed batch: its `samples` rows and their head figures, or (figures None) samples that were skipped."""

    rows: list[dict[str, Any]]
    figures: HeadFigures | None
    skipped: list[tuple[str, str]] = field(default_factory=list)


def compute(runner: Runner, samples: Sequence[Sample], batch_size: int) -> Iterator[Computed]:
    """Answer and measure `samples`, `batch_size` at a time; unreadable ones come first in their batch, skipped."""
    for i in range(0, len(samples), batch_size):
        good, images, bad = runner.prepare(samples[i:i + batch_size])
        if bad:
            yield Computed([], None, [(sample.id, reason) for sample, reason in bad])
        for lo, hi, (answers, figures, region_tokens, too_long) in runner.run_adaptive(good, images):
            rows = [sample_row(s, a, n, r, bool(t)) for s, a, n, r, t in
                    zip(good[lo:hi], answers, figures.image_token_count, region_tokens, too_long, strict=True)]
            yield Computed(rows, figures)


def skip_reason(reason: str) -> str:
    """The reason a skipped sample is counted under: 'unreadable image (OSError)' -> 'unreadable image'."""
    return reason.split(" (")[0]


def sample_row(sample: Sample, prediction: str, image_tokens: int, region_tokens: int,
               too_long: bool = False) -> dict[str, Any]:
    """The `samples` table row of one answered sample (meta `over_max_positions` marks a too-long prompt)."""
    meta = {k: v for k, v in sample.meta.items() if isinstance(v, (str, int, float, bool)) or v is None}
    if too_long:
        meta["over_max_positions"] = True
    if sample.options:
        meta["options"] = list(sample.options)
    if sample.box is not None:
        meta["box"] = [float(v) for v in sample.box]
    return {"sample_id": sample.id, "question_type": sample.question_type, "prompt_style": sample.prompt_style,
            "question": sample.question, "prediction": prediction, "answer": sample.answer,
            "correct": bool(score(sample, prediction)) if sample.answer is not None else None,
            "image_tokens": int(image_tokens), "region_tokens": int(region_tokens), "meta": meta}


def run(config: RunConfig, loaded: Loaded | None = None, dataset: Dataset | None = None,
        progress: Callable[[int, int, int], None] | None = None, start: Callable[[int], None] | None = None
        ) -> RunSummary:
    """Run a model over a dataset and store the result; safe to kill and `resume`.

    Errors that stop the run before it starts (bad data file, model, store) raise DataError / ModelError /
    StoreError. `progress(done, total, correct)` is called after each computed batch; batches are stored on a
    background thread (`BatchWriter`) while the next one computes, and all of them before `run` returns.
    """
    store_path = config.store_path()
    created = not store_path.exists()
    handle = None
    try:
        store = Store(store_path)  # opened first: a busy or unwritable store fails before the model loads
    except BaseException:
        _drop_if_empty(store_path, created)
        raise
    try:
        with store:
            config = prepared(config, store)
            dataset = dataset if dataset is not None else config.load_dataset()
            loaded = loaded if loaded is not None else config.load_model()
            layers, heads, attention_layers = head_grid(loaded, config.ablate)
            config = with_stages(config, layers)
            name = config.name or default_name(store, config, loaded.name, dataset.split)
            handle = store.start_run(
                name, model=loaded.name, family=loaded.family, dataset=dataset.name, split=dataset.split or "",
                layers=layers, heads=heads, readout=config.readout, ablation=ablation_label(config),
                config=stored_run_settings(config, layers, attention_layers), resume=config.resume, sweep=config.sweep,
                shard=config.shard, tags=config.tags or None,
            )
            return _run_samples(store, handle, config, loaded, dataset, store_path, progress, start)
    except BaseException:
        if handle is None:
            _drop_if_empty(store_path, created)
        raise


def with_stages(config: RunConfig, layers: int) -> RunConfig:
    """The stage boundaries checked against the model's depth; `--preset paper` fills in the reference's."""
    if config.stages is not None:
        return replace(config, stages=metrics.check_stages(config.stages, layers))
    if config.preset == "paper":
        return replace(config, stages=metrics.paper_stages(layers))
    return config


def _drop_if_empty(path: Path, created: bool) -> None:
    """Remove a store file this run created when nothing was written to it (the model or data failed to load)."""
    if not created or not path.exists():
        return
    try:
        with Store(path, read_only=True) as store:
            if len(store.runs()):
                return
    except StoreError:
        return
    for leftover in (path, path.with_name(path.name + ".wal")):
        leftover.unlink(missing_ok=True)


def _run_samples(store: Store, handle: RunHandle, config: RunConfig, loaded: Loaded, dataset: Dataset,
                 store_path: Path, progress: Callable[[int, int, int], None] | None,
                 start: Callable[[int], None] | None) -> RunSummary:
    """Compute and store the samples of an open run that are not stored yet; finish it and summarize."""
    name = handle.name
    samples = shard_samples(dataset.samples, config.shard)
    began = time.time()
    runtime_skips: Counter[str] = Counter()
    todo = [s for s in samples if s.id not in handle.done_ids]
    if start:
        start(len(todo))
    runner = Runner(loaded, config)
    skip_log = SkipLog(log)
    done = correct = 0

    def stored(rows: Sequence[dict[str, Any]]) -> None:
        log.info("stored %d samples of run %s", len(rows), name)

    try:
        with interrupt_guard(), BatchWriter(store, handle, on_stored=stored) as writer:
            for batch in compute(runner, todo, config.batch_size):
                for sample_id, reason in batch.skipped:
                    skip_log.add(skip_reason(reason), f"skipped sample {sample_id}: {reason}")
                    runtime_skips[skip_reason(reason)] += 1
                if batch.figures is None:
                    continue
                writer.submit(batch.rows, batch.figures)
                done += len(batch.rows)
                correct += sum(bool(r["correct"]) for r in batch.rows)
                if progress:
                    progress(done, len(todo), correct)
    except KeyboardInterrupt:
        skip_log.close()
        store.finish_run(handle, status="interrupted", skipped=_skips(dataset, runtime_skips))
        raise Interrupted(f"run {name!r} interrupted; finished batches are stored. Continue it with "
                          f"--name {name} --resume") from None
    except Exception:
        store.finish_run(handle, status="failed", skipped=_skips(dataset, runtime_skips))
        raise
    skip_log.close()
    summary = summarize(store, handle, store_path, _skips(dataset, runtime_skips), is_yesno(dataset),
                        time.time() - began, runner.max_positions)
    if runner.no_regions:
        summary.notes.append(runner.no_regions)
    store.finish_run(handle, status="done", accuracy=summary.accuracy, skipped=summary.skipped)
    return summary


def ablation_label(config: RunConfig) -> str:
    """The run's `ablation` column: 'none', or 'MODE:L.H,L.H'."""
    if not config.ablate:
        return "none"
    return f"{config.ablation}:" + ",".join(f"{layer}.{head}" for layer, head in config.ablate)


def _skips(dataset: Dataset, runtime: Counter[str]) -> dict[str, int]:
    counts = Counter(dataset.skip_summary())
    counts.update(runtime)
    return dict(counts)


def is_yesno(dataset: Dataset) -> bool:
    """Whether the dataset is scored yes/no (POPE), so its runs report POPE's metrics."""
    return bool(dataset.samples) and dataset.samples[0].scoring == "yesno"


def summarize(store: Store, handle: RunHandle, store_path: Path, skipped: dict[str, int], yesno: bool,
              seconds: float, max_positions: int | None = None) -> RunSummary:
    """The run's totals, computed in the store (a resumed run counts its earlier batches too)."""
    counts = store.query(
        "SELECT coalesce(question_type, 'all') AS question_type, count(*) AS n, count(correct) AS scored, "
        "count(*) FILTER (WHERE correct) AS correct FROM samples WHERE run_id = ? GROUP BY 1 ORDER BY 1",
        [handle.run_id],
    )
    n, scored, correct = (int(counts[c].sum()) for c in ("n", "scored", "correct"))
    by_type = {str(row.question_type): row.correct / row.scored for row in counts.itertuples() if row.scored}
    extra: dict[str, Any] = {}
    if scored and yesno:
        from vheads.data import pope_metrics

        answered = store.query("SELECT prediction, answer FROM samples WHERE run_id = ? AND correct IS NOT NULL "
                               "ORDER BY sample_id", [handle.run_id])
        extra["pope"] = pope_metrics(list(answered["prediction"]), list(answered["answer"]))
    long_prompts = int(store.query(
        "SELECT count(*) AS n FROM samples WHERE run_id = ? AND "
        "coalesce(json_extract(meta, '$.over_max_positions')::BOOLEAN, false)", [handle.run_id])["n"].iloc[0])
    return RunSummary(name=handle.name, run_id=handle.run_id, store=str(store_path), samples=n, correct=correct,
                      accuracy=correct / scored if scored else None, by_type=by_type,
                      skipped=skipped, status="done", seconds=seconds, extra=extra,
                      long_prompts=long_prompts, max_positions=max_positions)


__all__ = ["Interrupted", "RunConfig", "RunSummary", "StoreError", "parse_heads", "parse_shard", "run"]
