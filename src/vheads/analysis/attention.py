"""A stored run's samples run again: per-image-token attention of a few chosen heads, for drawing it back onto
the image (the report's overlays) and for grounding (`vheads ground`).

`TokenAttention` is a capture observer (like `HeadRecorder`): registered on the model's `CaptureSession`,
it keeps, for every sample, the readout row's attention to each image token for the chosen heads only.
`attention_maps` re-runs a model on samples with it and pairs each map with the image's token grid;
`reload_samples`, `run_model` and `run_ablation` get a run's samples, model and ablation back from its record, and
`changed_samples` says how many of the samples reloaded differ from those the run stored.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import torch
from PIL import Image
from torch import nn

from vheads.capture import CaptureSession, ablate
from vheads.capture.observer import Observer, is_prefill, prompt_layout
from vheads.capture.session import AttentionCall, CaptureError
from vheads.data import Sample, load_dataset
from vheads.heads import Head
from vheads.models import Loaded, TokenGrid, image_token_id, load

DATASET_FIELDS = ("data", "images", "split", "question_type", "prompt_style", "limit", "seed", "max_pixels")


class TokenAttention(Observer):
    """Context manager recording [heads, image tokens] attention of the readout row for each sample run inside it.

    `readout` `prompt` reads the last prompt position (prefill); `first-generated` and `generated` read the
    first generated token's row (a map per generated token would not fit one picture), so the model must be
    run with `generate(..., max_new_tokens >= 2)` for those.
    """

    def __init__(self, model: nn.Module, heads: Sequence[Head], readout: str = "prompt"):
        self.model = model
        self.heads = [(int(layer), int(head)) for layer, head in heads]
        self.readout = readout
        self.image_token_id = image_token_id(model.config)
        if self.image_token_id is None:
            raise CaptureError(f"{type(model).__name__} has no image token id in its config")
        self.slots: dict[int, list[tuple[int, int]]] = {}
        for slot, (layer, head) in enumerate(self.heads):
            self.slots.setdefault(layer, []).append((slot, head))
        self.maps: list[np.ndarray] = []
        self.session: CaptureSession | None = None
        self._positions: list[torch.Tensor] = []
        self._rows: torch.Tensor | None = None
        self._step = 0
        self._recording = False

    def on_forward(self, session: CaptureSession, kwargs: dict[str, Any]) -> None:
        """Start a batch on prefill (image positions, readout rows); count decode steps after it."""
        input_ids = kwargs.get("input_ids")
        if is_prefill(kwargs):
            if input_ids is None:
                raise CaptureError("TokenAttention needs input_ids to find the image tokens")
            _, image, last = prompt_layout(input_ids, kwargs.get("attention_mask"), self.image_token_id)
            self._positions = [torch.nonzero(row).squeeze(1) for row in image]
            self._rows = last[:, None]
            self._step = 0
            self._recording = self.readout == "prompt"
            self.maps.extend(np.full((len(self.heads), len(p)), np.nan, dtype=np.float32) for p in self._positions)
            return
        self._step += 1
        q_len = input_ids.shape[1] if input_ids is not None else 1
        self._rows = torch.full((len(self._positions), 1), q_len - 1, dtype=torch.long,
                                device=self._positions[0].device if self._positions else None)
        self._recording = self.readout != "prompt" and self._step == 1

    def observe(self, call: AttentionCall) -> None:
        """Keep the image-token columns of the chosen heads of this layer."""
        if not self._recording or call.layer not in self.slots:
            return
        probs = call.probabilities(self._rows)[:, :, 0]
        first = len(self.maps) - len(self._positions)
        for row, positions in enumerate(self._positions):
            for slot, head in self.slots[call.layer]:
                self.maps[first + row][slot] = probs[row, head, positions].cpu().numpy()


@dataclass
class SampleAttention:
    """One sample's image (as the model saw it), its token grid, and [heads, tokens] attention of `heads`."""

    sample: Sample
    image: Image.Image
    grid: TokenGrid
    heads: list[Head]
    maps: np.ndarray

    def visual_weight(self) -> np.ndarray:
        """Each head's total attention on the image (W of the readout row)."""
        return np.nansum(self.maps, axis=1)


def attention_maps(loaded: Loaded, samples: Sequence[Sample], heads: Sequence[Head], readout: str = "prompt",
                   ablate_heads: Sequence[Head] = (), ablation: str = "zero") -> list[SampleAttention]:
    """Run the model on each sample (one at a time) and return the attention maps of `heads` over its image.

    Ablated heads (`ablate_heads`, `ablation`) are switched off as in the run being drawn. Raises
    `GeometryError` when the family's image tokens cannot be mapped back to patches.
    """
    return list(iter_attention_maps(loaded, samples, heads, readout, ablate_heads, ablation))


def iter_attention_maps(loaded: Loaded, samples: Sequence[Sample], heads: Sequence[Head], readout: str = "prompt",
                        ablate_heads: Sequence[Head] = (), ablation: str = "zero") -> Iterator[SampleAttention]:
    """`attention_maps` one sample at a time, so a long run's images are not all held at once."""
    adapter, model = loaded.adapter, loaded.model
    for sample in samples:
        image = sample.image()
        inputs = adapter.encode([adapter.prompt(sample.text)], [[image]])
        grid = adapter.row_grids([[image]], inputs)[0][0]
        inputs = inputs.to(loaded.device)
        if "pixel_values" in inputs and inputs["pixel_values"].is_floating_point():
            inputs["pixel_values"] = inputs["pixel_values"].to(model.dtype)
        with ExitStack() as stack:
            stack.enter_context(torch.inference_mode())
            if ablate_heads:
                stack.enter_context(ablate(model, ablate_heads, ablation))
            recorder = stack.enter_context(TokenAttention(model, heads, readout))
            if readout == "prompt":
                model(**inputs)
            else:
                model.generate(**inputs, max_new_tokens=2, min_new_tokens=2, do_sample=False,
                               pad_token_id=adapter.tokenizer.pad_token_id)
        maps = recorder.maps[0][:, : len(grid)]
        yield SampleAttention(sample, image, grid, list(heads), maps)


def reload_samples(run: Mapping[str, Any], ids: Sequence[str]) -> list[Sample]:
    """The samples `ids` of a run, loaded again from its dataset with the run's own options (in `ids` order).

    Raises DataError when the dataset cannot be loaded; ids it no longer holds are left out.
    """
    config = run.get("config") or {}
    options = {key: config.get(key) for key in DATASET_FIELDS if config.get(key) is not None}
    dataset = load_dataset(config.get("dataset") or run["dataset"], **options)
    by_id = {s.id: s for s in dataset.samples}
    return [by_id[i] for i in ids if i in by_id]


def changed_samples(stored: pd.DataFrame, samples: Sequence[Sample]) -> int:
    """How many of a run's stored samples (`Store.samples`) the reloaded `samples` no longer hold as they were run:
    the id is gone, or the digest the run stored differs (runs stored before digests: question, answer or box)."""
    by_id = {s.id: s for s in samples}
    changed = 0
    for row in stored.to_dict("records"):
        sample = by_id.get(str(row["sample_id"]))
        if sample is None:
            changed += 1
        elif isinstance(row.get("digest"), str):
            changed += row["digest"] != sample.digest()
        else:
            meta = row.get("meta")
            box = meta.get("box") if isinstance(meta, dict) else None
            now = None if sample.box is None else [float(v) for v in sample.box]
            changed += (_text(row.get("question")), _text(row.get("answer")), box) != \
                (sample.question, _text(sample.answer), now)
    return changed


def _text(value: Any) -> str | None:
    """A stored text cell as str, None for NULL (NaN in a frame)."""
    return None if value is None or (isinstance(value, float) and np.isnan(value)) else str(value)


def run_model(run: Mapping[str, Any], device: str = "auto") -> Loaded:
    """A run's model loaded again with the run's dtype, attention kernel and remote-code setting."""
    config = run.get("config") or {}
    return load(run["model"], dtype=config.get("dtype", "auto"), device=device, attn=config.get("attn", "sdpa"),
                trust_remote_code=bool(config.get("trust_remote_code")))


def run_ablation(run: Mapping[str, Any]) -> tuple[list[Head], str]:
    """The heads a run ablated and how (so its samples run again as they ran)."""
    config = run.get("config") or {}
    heads = [(int(layer), int(head)) for layer, head in config.get("ablate") or []]
    return heads, str(config.get("ablation") or "zero")
