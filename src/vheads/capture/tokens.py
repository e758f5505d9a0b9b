"""`TokenAttention`: the readout row's attention to each image token, for a few chosen heads (overlays, grounding).

A capture observer like `HeadRecorder`, behind the same contract: it keeps per sample a [heads, image tokens] map
instead of reduced per-head figures.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from vheads.capture.observer import is_prefill, prompt_layout
from vheads.capture.session import AttentionCall, CaptureError, CaptureSession, Observer
from vheads.heads import Head
from vheads.models.families import image_token_id


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
