"""`HeadRecorder`: per-head attention figures of the readout rows, computed while the model runs."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

from vheads import metrics
from vheads.capture.maps import MAP_FIGURES, TokenMaps
from vheads.capture.observer import is_prefill, prompt_layout
from vheads.capture.session import AttentionCall, CaptureError, CaptureSession, Observer
from vheads.figures import stored_names
from vheads.models.families import image_token_id
from vheads.models.geometry import TokenGrid

READOUTS = ("prompt", "first-generated", "generated")
REGION = metrics.SUM_FIGURES.index("region_weight")
RECORDED = (*metrics.SUM_FIGURES, *MAP_FIGURES)


class HeadFigures:
    """Per-sample, per-head figures: float32 arrays [batch, layers, heads], NaN where undefined, one attribute per
    stored figure of `vheads.figures.FIGURES` (None: not measured, stored as NULL).

    `image_token_count` [batch] counts the image tokens of each sample; `readout_steps` [batch] counts the
    query rows averaged into each sample (1 for `prompt`, the generated tokens for `generated`, 0 where the
    readout never happened, e.g. `first-generated` on a single forward call). `pointing` (1 where the head's
    most-attended image token lies on a target) and `spatial_entropy` (`metrics.spatial_entropy`) are NaN where
    the recorder had no target mask or no token grids.
    """

    def __init__(self, image_token_count: np.ndarray, readout_steps: np.ndarray,
                 **values: np.ndarray | None) -> None:
        declared = stored_names()
        unknown = sorted(set(values) - set(declared))
        if unknown:
            raise TypeError(f"HeadFigures: {', '.join(unknown)} not declared in vheads.figures.FIGURES")
        self.values: dict[str, np.ndarray | None] = {name: values.get(name) for name in declared}
        self.image_token_count = image_token_count
        self.readout_steps = readout_steps

    def __getattr__(self, name: str) -> np.ndarray | None:
        values = self.__dict__.get("values", {})
        if name in values:
            return values[name]
        raise AttributeError(f"HeadFigures has no figure {name!r}")

    @property
    def batch(self) -> int:
        """Samples recorded."""
        return len(self.image_token_count)

    def region_share(self) -> np.ndarray:
        """Rw / W per sample and head."""
        return metrics.region_share(self.region_weight, self.visual_weight)


class _Group:
    """Running sums for the samples of one prefill call (and the decode steps that follow it)."""

    def __init__(self, layers: int, heads: int, masks: dict[str, torch.Tensor | None], rows: torch.Tensor,
                 image_tokens: torch.Tensor, grids: list[TokenGrid | None] | None = None):
        b = rows.shape[0]
        device = rows.device
        self.prompt_len = masks["image"].shape[1]
        self.rows = rows
        self.image_tokens = image_tokens
        region = masks["region"]
        self.has_region = torch.zeros_like(rows, dtype=torch.bool) if region is None else region.any(dim=1)
        columns = [masks["image"], region if region is not None else torch.zeros_like(masks["image"]),
                   masks["text"], masks["sink"]]
        self.key_matrix = torch.stack(columns, dim=-1).float()
        self.sums = torch.zeros(b, layers, heads, len(RECORDED), dtype=torch.float64, device=device)
        self.counts = torch.zeros(b, layers, heads, len(RECORDED), dtype=torch.float64, device=device)
        self.maps = TokenMaps(masks["image"], image_tokens, masks["target"], grids)
        self.pending_maps: dict[int, torch.Tensor] = {}
        self.steps = torch.zeros(b, dtype=torch.long, device=device)
        self.finished = torch.zeros(b, dtype=torch.bool, device=device)
        self.step = 0
        self.valid: torch.Tensor | None = None
        self.call_rows: torch.Tensor | int | None = None
        self._keys: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}
        self.pending: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def keys(self, kv_len: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """The prompt masks as 0/1 columns [batch, kv_len, 4] aligned to the current call's keys, and the
        number of image tokens among those keys [batch].

        Generated keys are in no mask. Built once per step, key length and device, not once per layer.
        """
        total = self.prompt_len + self.step
        key = (total, kv_len, device)
        if key not in self._keys:
            padded = torch.nn.functional.pad(self.key_matrix, (0, 0, 0, max(0, total - self.prompt_len)))
            matrix = padded[:, total - kv_len: total].to(device)
            self._keys = {key: (matrix, matrix[..., 0].sum(-1))}
        return self._keys[key]


class HeadRecorder(Observer):
    """Context manager that records per-head figures of every `model(...)` / `model.generate(...)` inside it.

    `readout` picks the query rows: `prompt` (the last prompt position, which produces the first answer
    token), `first-generated` (the first generated token's row) or `generated` (every step that produces a
    generated token, averaged per sample up to its end-of-sequence). Image positions come from the call's
    own `input_ids == image_token_id`; `region_mask` ([batch, seq] bool, optional) marks the image tokens of
    the asked-about region; a row with no marked token has no region (NaN). `target_mask` ([batch, seq] bool,
    optional) marks the image tokens on any target instance, for pointing; `grids` (one `TokenGrid` per row, of
    all its image tokens in order, or None) place the tokens on their patch grids, for spatial entropy. Several
    calls inside one context stack their samples along the batch axis.
    """

    def __init__(self, model: nn.Module, readout: str = "prompt", region_mask: torch.Tensor | None = None,
                 image_token_id: int | None = None, eos_token_ids: list[int] | None = None,
                 target_mask: torch.Tensor | None = None, grids: list[TokenGrid | None] | None = None):
        if readout not in READOUTS:
            raise ValueError(f"unknown readout {readout!r}; expected one of {', '.join(READOUTS)}")
        self.model = model
        self.readout = readout
        self.region_mask = region_mask
        self.target_mask = target_mask
        self.grids = grids
        self.image_token_id = image_token_id if image_token_id is not None else _image_token_id(model)
        self.eos_token_ids = eos_token_ids if eos_token_ids is not None else _eos_ids(model)
        self.session: CaptureSession | None = None
        self.groups: list[_Group] = []
        self._recording = False

    def on_forward(self, session: CaptureSession, kwargs: dict[str, Any]) -> None:
        """Called before each forward of the model: starts a sample group on prefill, a step on decode."""
        if self.groups:
            self._flush(self.groups[-1])
        input_ids = kwargs.get("input_ids")
        if is_prefill(kwargs):
            if input_ids is None:
                raise CaptureError("HeadRecorder needs input_ids to find the image tokens (got inputs_embeds)")
            self.groups.append(self._new_group(session, input_ids, kwargs.get("attention_mask")))
            group = self.groups[-1]
            self._recording = self.readout in ("prompt", "generated")
            last = group.rows
            group.call_rows = int(last[0]) if bool((last == last[0]).all()) else last[:, None]
            group.valid = torch.ones_like(group.finished)
            return
        if not self.groups or self.readout == "prompt":
            self._recording = False
            return
        group = self.groups[-1]
        group.step += input_ids.shape[1] if input_ids is not None else 1
        if input_ids is not None and self.eos_token_ids:
            eos = torch.tensor(self.eos_token_ids, device=input_ids.device)
            group.finished |= torch.isin(input_ids[:, -1], eos)
        q_len = input_ids.shape[1] if input_ids is not None else 1
        group.call_rows = q_len - 1
        group.valid = ~group.finished
        self._recording = self.readout == "generated" or (self.readout == "first-generated" and group.step == 1)

    def _new_group(self, session: CaptureSession, input_ids: torch.Tensor,
                   attention_mask: torch.Tensor | None) -> _Group:
        real, image, last = prompt_layout(input_ids, attention_mask, self.image_token_id)
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        first = torch.where(real & ~image, positions, input_ids.shape[1]).min(dim=1).values
        sink = positions[None, :] == first[:, None]
        text = real & ~image & ~sink
        region, target = (None if mask is None else _token_mask(mask, name, input_ids) & image
                          for mask, name in ((self.region_mask, "region_mask"), (self.target_mask, "target_mask")))
        grids = self.grids
        if grids is not None and len(grids) != input_ids.shape[0]:
            raise CaptureError(f"{len(grids)} token grids for a batch of {input_ids.shape[0]}")
        masks = {"image": image, "region": region, "text": text, "sink": sink, "target": target}
        return _Group(session.num_layers, session.num_heads, masks, last, image.sum(dim=1), grids)

    def observe(self, call: AttentionCall) -> None:
        """Reduce the readout rows of one layer's attention to the linear sums of the figures; the figures of
        all layers are finished together after the last one (`_flush`), which keeps per-layer work small."""
        if not self._recording or not self.groups:
            return
        group = self.groups[-1]
        probs = call.probabilities(group.call_rows)[:, :, 0]
        kv_len = call.key.shape[2]
        keys, image_tokens = group.keys(kv_len, probs.device)
        sums = metrics.masked_sums(probs, keys)
        group.pending[call.layer] = (sums.to(group.sums.device, torch.float64),
                                     image_tokens.to(group.sums.device, torch.float64))
        if group.maps.active:
            group.pending_maps[call.layer] = group.maps.gather(probs, group.prompt_len + group.step - kv_len)
        if call.layer == self.session.attention_layers[-1]:
            self._flush(group)

    def _flush(self, group: _Group) -> None:
        """Turn the pending per-layer sums of one step into figures and add them to the sample's running means."""
        if not group.pending:
            return
        layers = sorted(group.pending)
        sums = torch.stack([group.pending[i][0] for i in layers], dim=1)
        image_tokens = torch.stack([group.pending[i][1] for i in layers], dim=1)[..., None]
        group.pending.clear()
        figures = metrics.figures_from_sums(sums, image_tokens)
        no_box = ~group.has_region.to(figures.device)[:, None, None]
        figures[..., REGION] = figures[..., REGION].masked_fill(no_box, float("nan"))
        if group.pending_maps:
            maps = torch.stack([group.pending_maps[i] for i in layers], dim=1)
            group.pending_maps.clear()
            extra = group.maps.figures(maps).to(figures)
        else:
            extra = torch.full((*figures.shape[:-1], len(MAP_FIGURES)), float("nan"), dtype=figures.dtype,
                               device=figures.device)
        figures = torch.cat([figures, extra], dim=-1)
        ok = group.valid.to(figures.device)[:, None, None, None] & ~torch.isnan(figures)
        index = slice(None) if layers == list(range(group.sums.shape[1])) else layers
        group.sums[:, index] += torch.where(ok, figures, 0.0)
        group.counts[:, index] += ok
        group.steps += group.valid.to(group.steps.device).long()

    def result(self) -> HeadFigures:
        """The figures of every sample recorded so far (NaN where a figure is undefined or never read)."""
        if not self.groups:
            raise CaptureError("nothing recorded: run the model inside the `with HeadRecorder(...)` block")
        for g in self.groups:
            self._flush(g)
        means = []
        for g in self.groups:
            mean = g.sums / g.counts.clamp(min=1)
            means.append(torch.where(g.counts > 0, mean, float("nan")).float().cpu().numpy())
        stacked = np.concatenate(means, axis=0)
        out = {name: np.ascontiguousarray(stacked[..., i]) for i, name in enumerate(RECORDED)}
        counts = np.concatenate([g.image_tokens.cpu().numpy() for g in self.groups]).astype(np.int64)
        steps = np.concatenate([g.steps.cpu().numpy() for g in self.groups]).astype(np.int64)
        return HeadFigures(**out, image_token_count=counts, readout_steps=steps)


def _token_mask(mask: torch.Tensor, name: str, input_ids: torch.Tensor) -> torch.Tensor:
    """A [batch, seq] token mask on the inputs' device, checked against their shape."""
    mask = mask.to(device=input_ids.device, dtype=torch.bool)
    if mask.shape != input_ids.shape:
        raise CaptureError(f"{name} has shape {tuple(mask.shape)} but the inputs have {tuple(input_ids.shape)}")
    return mask


def _image_token_id(model: nn.Module) -> int:
    token = image_token_id(model.config)
    if token is None:
        raise CaptureError(f"{type(model).__name__} has no image token id in its config (image_token_id)")
    return token


def _eos_ids(model: nn.Module) -> list[int]:
    generation_config = getattr(model, "generation_config", None)
    eos = getattr(generation_config, "eos_token_id", None)
    if eos is None:
        eos = getattr(model.config.get_text_config(), "eos_token_id", None)
    if eos is None:
        return []
    return [int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos])]
