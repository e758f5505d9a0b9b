"""`ablate`: switch attention heads of the language model off, or blind them to the image, for forward and generate
alike."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from torch import nn

from vheads.capture.masked import KeyMask
from vheads.capture.positions import ImagePositions, resolve_image_token_id
from vheads.capture.pruned_cache import PrunedCache, PrunedLayer
from vheads.capture.session import Ablation, AttentionCall, CaptureSession
from vheads.heads import image_kv_heads, missing_heads

MODES = ("zero", "uniform", "image-blind", "flow-blind")
IMAGE_MODES = ("image-blind", "flow-blind")


class ablate(Ablation):  # noqa: N801 - used as a context manager, like torch.no_grad
    """Context manager that ablates `heads` ((layer, head) pairs) of the language model.

    `zero`: the head's attention output is zero at every position and step (the same as zeroing its slice
    of `o_proj`'s input). `uniform`: the head attends uniformly over the keys it may see (causal, unpadded),
    so its output is the mean of the visible values. `image-blind`: the image's keys leave the head's softmax
    (renormalised over the text) for every query row, in prefill and every decode step; `flow-blind`: only the
    text rows lose them (image rows attend as usual), which cuts the image's flow into the text through the head.
    Image positions come from each prefill's `input_ids == image_token_id` (the model's, or the one given, for
    bare language models); generated tokens are text. A row that sees no key once the image is gone gives 0.
    Composes with `HeadRecorder` in either order; a recorder reports the attention the model used (the uniform
    distribution of uniform-ablated heads, no image weight for image-blind ones).

    For image-blind and flow-blind heads, `cache()` gives a KV cache (`PrunedCache`) that does not hold the
    image's keys and values of the key/value heads whose query heads are all blind; passed to `generate` (under
    `compat.generate_cache_keyword(model)`) those heads' attention then runs on the text keys alone. The
    answers are the same with or without it; only the memory and the attention's work differ.
    """

    def __init__(self, model: nn.Module, heads: Iterable[tuple[int, int]], mode: str = "zero",
                 image_token_id: int | None = None):
        if mode not in MODES:
            raise ValueError(f"unknown ablation mode {mode!r}; expected one of {', '.join(MODES)}")
        self.model = model
        self.mode = mode
        self.heads = sorted({(int(layer), int(head)) for layer, head in heads})
        self.heads_by_layer: dict[int, list[int]] = {}
        for layer, head in self.heads:
            self.heads_by_layer.setdefault(layer, []).append(head)
        self.positions = (ImagePositions(resolve_image_token_id(model, image_token_id, f"ablate({mode!r})"))
                          if mode in IMAGE_MODES else None)
        self.session: CaptureSession | None = None
        self._cache: PrunedCache | None = None
        self._cache_live = False

    def __enter__(self) -> ablate:
        session = CaptureSession.attach(self.model)
        bad = missing_heads(self.heads, session.num_layers, session.num_heads)
        if bad:
            session.detach()
            raise ValueError(f"heads {', '.join(bad)} do not exist: the language model has "
                             f"{session.num_layers} layers x {session.num_heads} heads")
        linear = sorted({layer for layer, _ in self.heads} - set(session.attention_layers))
        if linear:
            session.detach()
            raise ValueError(f"layers {', '.join(map(str, linear))} have no softmax attention heads to ablate "
                             f"(attention layers: {', '.join(map(str, session.attention_layers))})")
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

    def cache(self) -> PrunedCache:
        """A new KV cache for one `generate` call inside this context that does not hold the image's keys and values
        of the key/value heads whose query heads are all blind (`heads.image_kv_heads`). Sliding-window and
        linear-attention layers keep transformers' own cache layers."""
        if self.positions is None:
            raise ValueError(f"ablate: a pruned cache needs mode image-blind or flow-blind, not {self.mode!r}")
        if self.session is None:
            raise ValueError("ablate: cache() is made inside the `with ablate(...)` block that uses it")
        config = self.session.configs[0]
        heads = int(config.num_attention_heads)
        kv_heads = int(getattr(config, "num_key_value_heads", None) or heads)
        keep = image_kv_heads(self.heads, heads, kv_heads, self.session.attention_layers)
        self._cache = PrunedCache(self.model.config, keep, kv_heads, hides="image")
        self._cache.prompt.active = True
        return self._cache

    def on_forward(self, session: CaptureSession, kwargs: dict[str, Any]) -> None:
        """Called before each forward of the model: image positions on prefill, one more text step on decode."""
        if self.positions is None:
            return
        self.positions.on_forward(kwargs)
        self._cache_live = self._cache is not None and self._cache.runs(kwargs)
        if self._cache_live and self.positions.prefill:
            self._cache.prompt.image = self.positions.image
            self._cache.prompt.hidden["image"] = self.positions.image

    def cache_layer(self, call: AttentionCall) -> PrunedLayer | None:
        """The pruned cache layer behind this call's keys, when the forward runs on this context's cache."""
        return self._cache.pruned_layer(call.layer) if self._cache_live else None

    def key_masks(self, call: AttentionCall) -> list[KeyMask]:
        """The keys this ablation takes out of the call's heads: the image's, for image-blind and flow-blind heads
        (flow-blind: on text rows only)."""
        heads = self.heads_by_layer.get(call.layer)
        if self.positions is None or not heads:
            return []
        keys = self.positions.keys(call.key.shape[2], call.key.device)[:, None, :]
        if self.mode == "image-blind":
            return [(heads, keys)]
        text_rows = ~self.positions.rows(call.query.shape[2], call.key.device)
        return [(heads, keys & text_rows[:, :, None])]
