"""A stored run replayed: its samples, model and ablation back from its record, and the per-image-token attention
of a few chosen heads on them, for drawing it back onto the image (the report's overlays) and for grounding
(`vheads ground`).

`attention_maps` re-runs a model on samples with `capture.TokenAttention` and pairs each map with the image's
token grid;
`reload_samples`, `run_model` and `run_ablation` get a run's samples, model and ablation back from its record, and
`changed_samples` says how many of the samples reloaded differ from those the run stored.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import pandas as pd
import torch
from PIL import Image

from vheads.capture import TokenAttention
from vheads.data import Sample
from vheads.heads import Head
from vheads.models import Loaded, TokenGrid
from vheads.pipeline.batches import enter_ablation
from vheads.pipeline.config import RunConfig


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
                   ablate_heads: Sequence[Head] = (), ablation: str = "zero",
                   fastv_point: tuple[int, float] | None = None) -> list[SampleAttention]:
    """Run the model on each sample (one at a time) and return the attention maps of `heads` over its image.

    Ablated heads (`ablate_heads`, `ablation`) and FastV's pruning (`fastv_point`: K, R) apply as in the run being
    drawn. Raises
    `GeometryError` when the family's image tokens cannot be mapped back to patches.
    """
    return list(iter_attention_maps(loaded, samples, heads, readout, ablate_heads, ablation, fastv_point))


def iter_attention_maps(loaded: Loaded, samples: Sequence[Sample], heads: Sequence[Head], readout: str = "prompt",
                        ablate_heads: Sequence[Head] = (), ablation: str = "zero",
                        fastv_point: tuple[int, float] | None = None) -> Iterator[SampleAttention]:
    """`attention_maps` one sample at a time, so a long run's images are not all held at once."""
    adapter, model = loaded.adapter, loaded.model
    for sample in samples:
        image = sample.image()
        inputs = adapter.encode([adapter.prompt(sample.text)], [[image]])
        grid = adapter.row_grids([[image]], inputs)[0][0]
        inputs = loaded.on_device(inputs)
        with ExitStack() as stack:
            stack.enter_context(torch.inference_mode())
            enter_ablation(stack, model, ablate_heads, ablation, fastv_point)
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
    by_id = {s.id: s for s in RunConfig.of_run(run).load_dataset().samples}
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
    return replace(RunConfig.of_run(run), device=device).load_model()


def run_ablation(run: Mapping[str, Any]) -> tuple[list[Head], str, tuple[int, float] | None]:
    """The heads a run ablated, how, and its FastV point (K, R) or None, so its samples run again as they ran."""
    config = RunConfig.of_run(run)
    fastv_point = (config.fastv_layer, config.fastv_keep) if config.fastv_layer is not None else None
    return list(config.ablate), config.ablation, fastv_point
