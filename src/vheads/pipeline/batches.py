"""Batches through the model: each sample's image read, answers generated with capture (and ablation) on,
halved on out-of-memory, and turned into `samples` rows with their head figures and the answer's confidence."""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from vheads.capture import HeadFigures, HeadRecorder, ablate, fastv
from vheads.compat import generate_cache_keyword
from vheads.data import BadSample, Sample, score
from vheads.models import GeometryError, Loaded, TokenGrid
from vheads.pipeline.config import RunConfig
from vheads.pipeline.pruning import PRUNING_MODES

log = logging.getLogger("vheads.run")


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


@dataclass
class Confidence:
    """How sure the model was of each answer of a batch, read from the logits greedy generation produced:
    the probability of the first answer token and the mean log-probability of the answer's tokens."""

    first_token_prob: np.ndarray
    mean_logprob: np.ndarray


def eos_ids(model: torch.nn.Module) -> list[int]:
    """The token ids that end an answer (the generation config's `eos_token_id`, one or a list)."""
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if eos is None:
        return []
    return [int(eos)] if isinstance(eos, int) else [int(e) for e in eos]


def answer_confidence(logits: Sequence[torch.Tensor], tokens: torch.Tensor, eos: Sequence[int]) -> Confidence:
    """Each answer's confidence from the raw logits of greedy generation, one `[batch, vocab]` tensor per step,
    and the tokens chosen, `[batch, steps]`.

    Softmax in fp32. An answer's tokens run up to and including its first end-of-sequence token (the model chose to
    stop there; what follows is padding); without one, every generated token counts. Raw logits, not generate's
    processed scores, so a repetition penalty or suppressed tokens do not change the figure.
    """
    steps = min(len(logits), tokens.shape[1])
    if steps == 0:
        nan = np.full(tokens.shape[0], np.nan)
        return Confidence(nan, nan.copy())
    chosen = tokens[:, :steps].to(logits[0].device)
    logp = torch.stack([torch.log_softmax(step.float(), dim=-1).gather(1, chosen[:, t:t + 1])[:, 0]
                        for t, step in enumerate(logits[:steps])], dim=1)
    ends = torch.isin(chosen, torch.tensor(list(eos), dtype=chosen.dtype, device=chosen.device)) if eos else \
        torch.zeros_like(chosen, dtype=torch.bool)
    after_end = (ends.cumsum(dim=1) - ends.long()) > 0
    keep = (~after_end).float()
    mean = (logp * keep).sum(dim=1) / keep.sum(dim=1)
    return Confidence(logp[:, 0].exp().cpu().numpy().astype(np.float64), mean.cpu().numpy().astype(np.float64))



def enter_ablation(stack: ExitStack, model: Any, heads: Sequence[tuple[int, int]], mode: str,
                   fastv_point: tuple[int, float] | None = None) -> ablate | fastv | None:
    """Enter a run's head ablation (`heads` in `mode`) and FastV point (K, R) on `model`, as the run had them; returns
    the pruning context (image-blind / flow-blind heads, or FastV) whose cache a generate may use, else None. The one
    place runs and their replays (overlays, grounding) switch them on."""
    pruning: ablate | fastv | None = None
    if heads:
        context = stack.enter_context(ablate(model, heads, mode))
        pruning = context if mode in PRUNING_MODES else None
    if fastv_point is not None:
        pruning = stack.enter_context(fastv(model, layer=fastv_point[0], keep=fastv_point[1]))
    return pruning

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
                  ) -> tuple[list[str], Any, np.ndarray, np.ndarray, Confidence]:
        """Generate answers for one batch and record its head figures; returns answers, figures, region sizes,
        which prompts are longer than the model's maximum positions, and each answer's confidence."""
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
        inputs = self.loaded.on_device(inputs)
        with ExitStack() as stack:
            stack.enter_context(torch.inference_mode())
            fastv_point = (self.config.fastv_layer, self.config.fastv_keep) if self.config.fastv_layer else None
            pruning = enter_ablation(stack, model, self.config.ablate, self.config.ablation, fastv_point)
            recorder = stack.enter_context(HeadRecorder(model, self.config.readout, region_mask=region,
                                                        target_mask=layout.target, grids=layout.grids))
            # a pruning run generates on a cache that does not hold what it took away (the same answers)
            cache = {generate_cache_keyword(model): pruning.cache()} if pruning is not None else {}
            output = model.generate(**inputs, max_new_tokens=self.config.max_new_tokens, do_sample=False,
                                    pad_token_id=adapter.tokenizer.pad_token_id, output_logits=True,
                                    return_dict_in_generate=True, **cache)
        prompt_len = inputs["input_ids"].shape[1]
        answers = adapter.decode(output.sequences, prompt_len)
        confidence = answer_confidence(output.logits, output.sequences[:, prompt_len:], eos_ids(model))
        return answers, recorder.result(), region_tokens, too_long, confidence

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
        for lo, hi, (answers, figures, region_tokens, too_long, sure) in runner.run_adaptive(good, images):
            rows = [sample_row(s, a, n, r, bool(t), (p, m)) for s, a, n, r, t, p, m in
                    zip(good[lo:hi], answers, figures.image_token_count, region_tokens, too_long,
                        sure.first_token_prob, sure.mean_logprob, strict=True)]
            yield Computed(rows, figures)


def skip_reason(reason: str) -> str:
    """The reason a skipped sample is counted under: 'unreadable image (OSError)' -> 'unreadable image'."""
    return reason.split(" (")[0]


def sample_row(sample: Sample, prediction: str, image_tokens: int, region_tokens: int,
               too_long: bool = False, confidence: tuple[float, float] | None = None) -> dict[str, Any]:
    """The `samples` table row of one answered sample (meta `over_max_positions` marks a too-long prompt);
    `confidence` is (first-token probability, mean log-probability) of its answer."""
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
            "image_tokens": int(image_tokens), "region_tokens": int(region_tokens), "meta": meta,
            "digest": sample.digest(),
            "first_token_prob": None if confidence is None else float(confidence[0]),
            "mean_logprob": None if confidence is None else float(confidence[1])}
