"""`fastv`: FastV (Chen et al., 2024) inside the attention function — after layer K only the image tokens the last
prompt row attended to most stay as keys, for every head, row and decode step."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from vheads.capture.masked import KeyMask
from vheads.capture.positions import ImagePositions, resolve_image_token_id
from vheads.capture.pruned_cache import PrunedCache, PrunedLayer
from vheads.capture.session import Ablation, AttentionCall, CaptureSession


def top_image_tokens(attention: torch.Tensor, image: torch.Tensor, keep: float) -> torch.Tensor:
    """Per row, the ceil(keep * n_image) image tokens with the most `attention` [batch, seq]: bool [batch, seq].

    Ties go to the earlier token (a stable sort), so the choice does not depend on the kernel."""
    kept = torch.zeros_like(image)
    for row in range(image.shape[0]):
        positions = torch.nonzero(image[row]).squeeze(1)
        n = math.ceil(keep * len(positions))
        if n == 0:
            continue
        order = torch.sort(attention[row, positions].float(), descending=True, stable=True).indices
        kept[row, positions[order[:n]]] = True
    return kept


class fastv(Ablation):  # noqa: N801 - used as a context manager, like torch.no_grad and ablate
    """Context manager that prunes image tokens the FastV way while the model runs.

    Layers 0..layer-1 see every token. At layer `layer`-1 (in hybrid models, the last softmax-attention layer
    below `layer`) the attention of each batch row's last prompt row, averaged over all heads, ranks that row's
    image tokens; from layer `layer` on, in every attention layer, row and decode step, only the top ceil(keep *
    n_image) image tokens stay as keys, for all heads. For the rows that stay this equals dropping the others from
    the sequence, as FastV does (the linear-attention layers of hybrid models still read every token). `kept`
    holds, per sample run inside the context, the positions of the image tokens kept.

    `cache()` gives a KV cache (`PrunedCache`) whose full-attention layers from `layer` on hold only the kept image
    tokens; passed to `generate` (under `compat.generate_cache_keyword(model)`) those layers' attention runs on
    the kept keys alone. The answers are the same with or without it.
    """

    mode = "fastv"

    def __init__(self, model: nn.Module, layer: int, keep: float, image_token_id: int | None = None):
        if not 0 < keep <= 1:
            raise ValueError(f"fastv: keep must be in (0, 1], got {keep}")
        if layer < 1:
            raise ValueError(f"fastv: layer must be at least 1 (layer 0 has no attention to rank by), got {layer}")
        self.model = model
        self.layer = int(layer)
        self.keep = float(keep)
        self.heads_by_layer: dict[int, list[int]] = {}
        self.positions = ImagePositions(resolve_image_token_id(model, image_token_id, "fastv"))
        self.rank_layer = -1
        self.kept: list[torch.Tensor] = []
        self._dropped: torch.Tensor | None = None
        self._cache: PrunedCache | None = None
        self._cache_live = False
        self.session: CaptureSession | None = None

    def __enter__(self) -> fastv:
        session = CaptureSession.attach(self.model)
        below = [layer for layer in session.attention_layers if layer < self.layer]
        if self.layer >= session.num_layers or not below:
            session.detach()
            if self.layer >= session.num_layers:
                raise ValueError(f"fastv: layer {self.layer} is not below the language model's "
                                 f"{session.num_layers} layers")
            raise ValueError(f"fastv: no softmax attention layer below layer {self.layer} to rank the image tokens "
                             f"(attention layers: {', '.join(map(str, session.attention_layers))})")
        self.rank_layer = below[-1]
        session.ablations.append(self)
        self.session = session
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._cache is not None:
            self._cache.prompt.active = False
        session, self.session = self.session, None
        if session is not None:
            session.ablations.remove(self)
            session.detach()

    def kept_counts(self) -> list[int]:
        """Image tokens kept, per sample run inside the context."""
        return [len(k) for k in self.kept]

    def cache(self) -> PrunedCache:
        """A new KV cache for one `generate` call inside this context, whose full-attention layers from `layer` on
        hold only the kept image tokens (sliding-window and linear-attention layers keep transformers' own)."""
        if self.session is None:
            raise ValueError("fastv: cache() is made inside the `with fastv(...)` block that uses it")
        config = self.session.configs[0]
        kv_heads = int(getattr(config, "num_key_value_heads", None) or config.num_attention_heads)
        later = {layer: [] for layer in self.session.attention_layers if layer >= self.layer}
        self._cache = PrunedCache(self.model.config, later, kv_heads, hides="dropped")
        self._cache.prompt.active = True
        return self._cache

    def on_forward(self, session: CaptureSession, kwargs: dict[str, Any]) -> None:
        """Called before each forward: a prefill forgets the last ranking."""
        self.positions.on_forward(kwargs)
        self._cache_live = self._cache is not None and self._cache.runs(kwargs)
        if self.positions.prefill:
            self._dropped = None
            if self._cache_live:
                self._cache.prompt.image = self.positions.image

    def after(self, call: AttentionCall) -> None:
        """At the ranking layer of a prefill, rank each row's image tokens by its last prompt row's attention."""
        if call.layer != self.rank_layer or not self.positions.prefill:
            return
        last = self.positions.last.to(call.query.device)
        image = self.positions.keys(call.key.shape[2], call.key.device)
        attention = call.probabilities(last[:, None])[:, :, 0].mean(dim=1)  # [batch, kv]
        kept = top_image_tokens(attention, image, self.keep)
        self._dropped = image & ~kept
        if self._cache_live:
            self._cache.prompt.hidden["dropped"] = self._dropped
        self.kept.extend(torch.nonzero(row).squeeze(1).cpu() for row in kept)

    def cache_layer(self, call: AttentionCall) -> PrunedLayer | None:
        """The pruned cache layer behind this call's keys, when the forward runs on this context's cache."""
        return self._cache.pruned_layer(call.layer) if self._cache_live else None

    def key_masks(self, call: AttentionCall) -> list[KeyMask]:
        """From layer `layer` on, every head loses the image tokens that were not kept."""
        if call.layer < self.layer or self._dropped is None:
            return []
        dropped = self._dropped.to(call.key.device)
        grown = self.positions.total - dropped.shape[1]
        if grown > 0:
            dropped = torch.nn.functional.pad(dropped, (0, grown))
        kv_len = call.key.shape[2]
        return [(None, dropped[:, self.positions.total - kv_len: self.positions.total][:, None, :])]
