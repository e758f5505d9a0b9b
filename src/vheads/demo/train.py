"""Train the embedded demo model on ShapesQA generated on the fly, and measure it with the inference contract."""

from __future__ import annotations

import copy
import json
import math
import random
import sys
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from transformers import LlavaForConditionalGeneration, LlavaProcessor

from vheads.data.sample import Sample
from vheads.data.shapes import COLORS, SHAPES, scene_for, shapes_sample, shapes_samples
from vheads.demo.build import build_demo

QUESTION_TYPES = ("general", "obj", "super")
STYLE_MIX = (("visual", 0.75), ("plain", 0.1), ("none", 0.15))


@dataclass(frozen=True)
class Stage:
    """What the training batches hold at one point of the curriculum."""

    max_count: int
    question_types: tuple[str, ...]


CURRICULUM = (
    Stage(2, ("obj",)),
    Stage(3, ("obj",)),
    Stage(3, QUESTION_TYPES),
    Stage(4, QUESTION_TYPES),
    Stage(5, QUESTION_TYPES),
)
ADVANCE_AT = 0.85
LAST_STAGE_BY = 0.6


def curriculum(level: int) -> Stage:
    """Stage `level` of the curriculum: object questions with few targets first, then all types up to 5."""
    return CURRICULUM[min(level, len(CURRICULUM) - 1)]


def train_batch(step: int, batch_size: int, seed: int, stage: Stage) -> list[Sample]:
    """The training samples of one step: deterministic in (seed, step), train split only, styles mixed."""
    rng = random.Random(seed * 1_000_003 + step)
    styles, weights = zip(*STYLE_MIX, strict=True)
    samples = []
    for j in range(batch_size):
        samples.append(
            shapes_sample(
                step * batch_size + j,
                seed=seed,
                split="train",
                question_type=rng.choice(stage.question_types),
                prompt_style=rng.choices(styles, weights=weights)[0],
                max_count=stage.max_count,
            )
        )
    return samples


class Probes(torch.nn.Module):
    """Training-only linear read-outs that give the model direct signals early on; not part of the saved model.

    On each image token (the projector's output): the class of the object centred there (none, or colour x
    shape) and whether it is boxed. On the last prompt position at the middle layer of the language model:
    the target's colour and shape, where the question and image determine them.
    """

    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.cell_class = torch.nn.Linear(hidden, 1 + len(COLORS) * len(SHAPES))
        self.cell_boxed = torch.nn.Linear(hidden, 2)
        self.target_color = torch.nn.Linear(hidden, len(COLORS))
        self.target_shape = torch.nn.Linear(hidden, len(SHAPES))

    def loss(self, cells: torch.Tensor, last: torch.Tensor, targets: dict[str, torch.Tensor]) -> torch.Tensor:
        """Summed cross-entropies; `cells` is (batch, image tokens, hidden), `last` is (batch, hidden)."""
        ce = torch.nn.functional.cross_entropy
        total = ce(self.cell_class(cells).flatten(0, 1), targets["cell_class"].flatten())
        total = total + ce(self.cell_boxed(cells).flatten(0, 1), targets["cell_boxed"].flatten())
        known = targets["known"]
        if known.any():
            total = total + ce(self.target_color(last[known]), targets["color"][known])
            total = total + ce(self.target_shape(last[known]), targets["shape"][known])
        return total


def probe_targets(samples: Sequence[Sample], stage: Stage, grid: int) -> dict[str, torch.Tensor]:
    """What `Probes` should read: per image token (grid x grid patches) the class of the object centred in its
    patch (0: none; one token per object, so counting can add tokens up) and whether its patch overlaps the
    drawn box; per sample the target class, and whether the question plus image determine it."""
    colors, shapes = list(COLORS), list(SHAPES)
    cell_class = torch.zeros((len(samples), grid * grid), dtype=torch.long)
    cell_boxed = torch.zeros_like(cell_class)
    for row, sample in enumerate(samples):
        scene = scene_for(sample.meta["index"], sample.meta["seed"], "train", scene_size(sample), stage.max_count)
        edges = np.arange(grid + 1) * scene.image_size / grid
        for thing in scene.things:
            cell = int(thing.cy * grid / scene.image_size) * grid + int(thing.cx * grid / scene.image_size)
            cell_class[row, cell] = 1 + colors.index(thing.color) * len(shapes) + shapes.index(thing.shape)
        if sample.prompt_style == "visual":
            cell_boxed[row] = torch.from_numpy(_patch_overlap(scene.box, edges).ravel() > 0).long()
    return {
        "cell_class": cell_class,
        "cell_boxed": cell_boxed,
        "color": torch.tensor([colors.index(s.meta["color"]) for s in samples]),
        "shape": torch.tensor([shapes.index(s.meta["shape"]) for s in samples]),
        "known": torch.tensor([answerable(s) for s in samples]),
    }


def _patch_overlap(box: tuple[float, float, float, float], edges: np.ndarray) -> np.ndarray:
    """Share of each patch (rows x cols, cut at `edges` pixels on both axes) that `box` covers."""
    x1, y1, x2, y2 = box
    wide = np.clip(np.minimum(x2, edges[1:]) - np.maximum(x1, edges[:-1]), 0, None)
    high = np.clip(np.minimum(y2, edges[1:]) - np.maximum(y1, edges[:-1]), 0, None)
    return np.outer(high, wide) / np.diff(edges)[0] ** 2


def answerable(sample: Sample) -> bool:
    """Whether the question and the image determine the target: an object question, or the box drawn."""
    return sample.question_type == "obj" or sample.prompt_style == "visual"


def scene_size(sample: Sample) -> int:
    """The side of a ShapesQA sample's square image."""
    return int(sample.meta["image_size"][0])


def prompt_for(processor: LlavaProcessor, sample: Sample) -> str:
    """The chat prompt of the inference contract for one sample."""
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": sample.text}]}]
    return processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


def encode_train(processor: LlavaProcessor, samples: Sequence[Sample]) -> dict[str, torch.Tensor]:
    """Right-padded training tensors: the inference prompt tokens, then answer + eos; loss on the answer only."""
    tok = processor.tokenizer
    enc = processor(
        images=[s.image() for s in samples],
        text=[prompt_for(processor, s) for s in samples],
        return_tensors="pt",
        padding=True,
    )
    rows, labels = [], []
    for ids, mask, sample in zip(enc["input_ids"], enc["attention_mask"], samples, strict=True):
        prompt = ids[mask.bool()].tolist()
        answer = tok(str(sample.answer), add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        rows.append(prompt + answer)
        labels.append([-100] * len(prompt) + answer)
    width = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), width), tok.pad_token_id, dtype=torch.long)
    label_ids = torch.full((len(rows), width), -100, dtype=torch.long)
    attention = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (row, lab) in enumerate(zip(rows, labels, strict=True)):
        input_ids[i, : len(row)] = torch.tensor(row)
        label_ids[i, : len(lab)] = torch.tensor(lab)
        attention[i, : len(row)] = 1
    return {
        "input_ids": input_ids,
        "attention_mask": attention,
        "pixel_values": enc["pixel_values"],
        "labels": label_ids,
    }


@torch.no_grad()
def predict(
    model: LlavaForConditionalGeneration,
    processor: LlavaProcessor,
    samples: Sequence[Sample],
    batch_size: int = 64,
    blank: bool = False,
) -> list[str]:
    """Greedy answers exactly as the vheads pipeline produces them (left padding, 4 new tokens)."""
    was_training = model.training
    model.eval()
    answers: list[str] = []
    for start in range(0, len(samples), batch_size):
        chunk = samples[start : start + batch_size]
        images = [s.image() for s in chunk]
        if blank:
            images = [_blank_like(im) for im in images]
        inputs = processor(
            images=images, text=[prompt_for(processor, s) for s in chunk], return_tensors="pt", padding=True
        )
        out = model.generate(**inputs, max_new_tokens=4, do_sample=False)
        decoded = processor.batch_decode(out[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
        answers += [d.strip() for d in decoded]
    model.train(was_training)
    return answers


def _blank_like(image: Image.Image) -> Image.Image:
    """A white image of the same size."""
    return Image.new("RGB", image.size, (255, 255, 255))


def evaluate(
    model: LlavaForConditionalGeneration,
    processor: LlavaProcessor,
    samples: Sequence[Sample],
    blank: bool = False,
) -> dict[str, float]:
    """Greedy accuracy overall and per question type."""
    answers = predict(model, processor, samples, blank=blank)
    hits: dict[str, list[bool]] = defaultdict(list)
    for sample, answer in zip(samples, answers, strict=True):
        ok = answer == str(sample.answer)
        hits["all"].append(ok)
        hits[str(sample.question_type)].append(ok)
    return {k: sum(v) / len(v) for k, v in sorted(hits.items())}


def held_out(n: int, prompt_style: str = "visual", split: str = "test") -> list[Sample]:
    """Held-out ShapesQA questions (test split by default; "val" picks checkpoints), question types cycled."""
    return shapes_samples(n, seed=0, split=split, prompt_style=prompt_style)


def lr_factor(progress: float, warmup: float = 0.03, floor: float = 0.05) -> float:
    """Linear warm-up then cosine decay to `floor` of the peak, as a function of training progress in [0, 1]."""
    if progress < warmup:
        return max(progress / warmup, 0.01)
    t = min((progress - warmup) / (1 - warmup), 1.0)
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * t))


def answer_positions(labels: torch.Tensor) -> torch.Tensor:
    """Index of each row's first supervised token (the answer)."""
    return (labels != -100).int().argmax(dim=1)


def answer_accuracy(logits: torch.Tensor, labels: torch.Tensor, rows: torch.Tensor | None = None) -> float:
    """Share of rows (all, or those where `rows` is true) whose first supervised token (the answer) is the argmax
    of the logits before it."""
    first = answer_positions(labels)
    index = torch.arange(labels.shape[0])
    hits = logits[index, first - 1].argmax(dim=-1) == labels[index, first]
    if rows is not None:
        hits = hits[rows]
    return hits.float().mean().item() if len(hits) else 0.0


def _optimizer(model: torch.nn.Module, lr: float) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only (not on norms, biases or embeddings)."""
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embed" not in n]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2 or "embed" in n]
    groups = [{"params": decay, "weight_decay": 0.01}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.98))


class HeadDropout:
    """Training-only head dropout: each text attention head's output is zeroed for a whole sample with
    probability `p` (the rest scaled by 1 / (1 - p)), through a pre-hook on `o_proj`.

    A model trained this way cannot lean on one head a random pick could take out, as a large model cannot.
    """

    def __init__(self, model: LlavaForConditionalGeneration, p: float) -> None:
        text = model.config.text_config
        self.p, self.heads = p, text.num_attention_heads
        layers = model.model.language_model.layers
        self._hooks = [layer.self_attn.o_proj.register_forward_pre_hook(self._drop) for layer in layers]

    def _drop(self, module: torch.nn.Module, args: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...] | None:
        if not module.training or self.p <= 0:
            return None
        hidden = args[0]
        keep = torch.rand(hidden.shape[0], 1, self.heads, 1, device=hidden.device) >= self.p
        per_head = hidden.unflatten(-1, (self.heads, -1)) * keep / (1 - self.p)
        return (per_head.flatten(-2), *args[1:])

    def remove(self) -> None:
        """Detach the hooks (the saved model is a plain LLaVA)."""
        for hook in self._hooks:
            hook.remove()


class DemoTrainer:
    """The model, its processor, the probes and the optimiser, and one optimisation step on a batch."""

    def __init__(
        self, seed: int, lr: float, probe_weight: float, tiny: bool = False, head_dropout: float = 0.0
    ) -> None:
        torch.manual_seed(seed)
        self.model, self.processor = build_demo(seed, tiny=tiny)
        self.model.train()
        self.head_dropout = HeadDropout(self.model, head_dropout)
        self.probes = Probes(self.model.config.text_config.hidden_size)
        self.probe_weight = probe_weight
        self.middle = self.model.config.text_config.num_hidden_layers // 2
        vision = self.model.config.vision_config
        self.grid = vision.image_size // vision.patch_size
        self.lr = lr
        self.opt = _optimizer(torch.nn.ModuleList([self.model, self.probes]), lr)
        self._features: list[torch.Tensor] = []
        projector = self.model.model.multi_modal_projector
        self._hook = projector.register_forward_hook(lambda _m, _i, out: self._features.append(out))

    def step(self, samples: Sequence[Sample], stage: Stage, lr_scale: float) -> tuple[float, float, float]:
        """One AdamW step (clipped gradients) at `lr_scale` of the peak; returns (answer loss, probe loss, accuracy)."""
        for group in self.opt.param_groups:
            group["lr"] = self.lr * lr_scale
        batch = encode_train(self.processor, samples)
        self._features.clear()
        out = self.model(**batch, output_hidden_states=self.probe_weight > 0)
        total, probe_loss = out.loss, torch.zeros(())
        if self.probe_weight > 0:
            rows = torch.arange(len(samples))
            last = out.hidden_states[self.middle][rows, answer_positions(batch["labels"]) - 1]
            probe_loss = self.probes.loss(self._features[0], last, probe_targets(samples, stage, self.grid))
            total = total + self.probe_weight * probe_loss
        total.backward()
        torch.nn.utils.clip_grad_norm_([*self.model.parameters(), *self.probes.parameters()], 1.0)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        determined = torch.tensor([answerable(s) for s in samples])
        return out.loss.item(), probe_loss.item(), answer_accuracy(out.logits, batch["labels"], determined)

    def finish(self) -> None:
        """Detach the probes and head dropout from the model (the saved model is a plain LLaVA)."""
        self._hook.remove()
        self.head_dropout.remove()
        self.model.eval()


def train_demo(
    out_dir: str | Path,
    steps: int | None = None,
    minutes: float | None = None,
    seed: int = 0,
    batch_size: int = 32,
    lr: float = 1e-3,
    eval_every: int = 250,
    eval_samples: int = 300,
    final_eval_samples: int = 1000,
    probe_weight: float = 1.0,
    head_dropout: float = 0.0,
    tiny: bool = False,
    log: Callable[[str], None] = print,
) -> dict:
    """Train the demo LLaVA on ShapesQA and save the best checkpoint (by validation accuracy) to `out_dir`.

    Give `steps` (reproducible: the same seed gives the same model on one machine) or `minutes`
    (a wall-clock budget; the schedule follows elapsed time), or both (whichever ends first).
    Every `eval_every` steps greedy accuracy is measured on `eval_samples` validation questions (val split)
    to pick the checkpoint; the final figures use `final_eval_samples` test questions, on real and on blank
    images. Training only ever sees the train split.
    `probe_weight` scales the auxiliary losses of `Probes`; `head_dropout` is the chance that a head is zeroed
    for a training sample (`HeadDropout`); `tiny` builds a toy-sized model (for tests).
    Returns the metrics also written to `out_dir/training.json`.
    """
    if steps is None and minutes is None:
        raise ValueError("give steps or minutes")
    if not 0 <= head_dropout < 1:
        raise ValueError(f"head dropout {head_dropout}: must be in [0, 1)")
    trainer = DemoTrainer(seed, lr, probe_weight, tiny, head_dropout)
    model, processor = trainer.model, trainer.processor
    eval_set = held_out(eval_samples, split="val")
    start = time.monotonic()
    best: tuple[float, int, dict] = (-1.0, 0, {})
    history: list[dict] = []
    step, level, losses, probe_losses, train_acc = 0, 0, [], [0.0], 0.0
    while True:
        elapsed = time.monotonic() - start
        progress = max(step / steps if steps else 0.0, elapsed / (60 * minutes) if minutes else 0.0)
        if progress >= 1.0:
            break
        if progress >= LAST_STAGE_BY:
            level = max(level, len(CURRICULUM) - 1)
        samples = train_batch(step, batch_size, seed, curriculum(level))
        loss, probe_loss, acc = trainer.step(samples, curriculum(level), lr_factor(progress))
        step += 1
        losses.append(loss)
        probe_losses.append(probe_loss)
        train_acc = 0.95 * train_acc + 0.05 * acc
        if train_acc >= ADVANCE_AT and level < len(CURRICULUM) - 1:
            level, train_acc = level + 1, 0.0
            log(f"step {step}: curriculum stage {level} {curriculum(level)}")
        if step % eval_every == 0:
            scores = evaluate(model, processor, eval_set)
            mean_loss = _mean(losses[-eval_every:])
            history.append(
                {"step": step, "stage": level, "loss": round(mean_loss, 4), "minutes": round(elapsed / 60, 2), **scores}
            )
            log(
                f"step {step} stage {level} loss {mean_loss:.3f} probe {_mean(probe_losses[-eval_every:]):.3f} "
                f"train-acc {train_acc:.2f} lr {lr * lr_factor(progress):.2e} {elapsed / 60:.1f} min "
                f"val {scores}"
            )
            if scores["all"] > best[0]:
                best = (scores["all"], step, copy.deepcopy(model.state_dict()))
    trainer.finish()
    scores = evaluate(model, processor, eval_set)
    if scores["all"] >= best[0]:
        best = (scores["all"], step, copy.deepcopy(model.state_dict()))
    model.load_state_dict(best[2])
    wall = time.monotonic() - start
    final = evaluate(model, processor, held_out(final_eval_samples))
    blank = evaluate(model, processor, held_out(final_eval_samples), blank=True)
    log(f"done: {step} steps, {wall / 60:.1f} min, best step {best[1]}; held-out {final}; blank {blank}")
    metrics = {
        "command": " ".join(sys.argv),
        "seed": seed,
        "steps": step,
        "best_step": best[1],
        "minutes": round(wall / 60, 2),
        "batch_size": batch_size,
        "lr": lr,
        "head_dropout": head_dropout,
        "threads": torch.get_num_threads(),
        "held_out_samples": final_eval_samples,
        "held_out_accuracy": final,
        "blank_image_accuracy": blank,
        "initial_loss": round(_mean(losses[:10]), 4),
        "final_loss": round(_mean(losses[-max(10, len(losses) // 10) :]), 4),
        "history": history,
    }
    _save(Path(out_dir), model, processor, metrics)
    return metrics


def _save(out: Path, model: LlavaForConditionalGeneration, processor: LlavaProcessor, metrics: dict) -> None:
    """Model safetensors, processor files and training.json."""
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    (out / "training.json").write_text(json.dumps(metrics, indent=2) + "\n")


def _mean(values: Sequence[float]) -> float:
    """Arithmetic mean (NaN when empty)."""
    return sum(values) / len(values) if values else float("nan")
