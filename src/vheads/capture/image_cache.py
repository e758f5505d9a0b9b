"""`ImageFreeCache`: a KV cache that does not hold the image's keys and values for the key/value heads whose query
heads are all image-blind, and `cache_bytes`, what a cache holds.

Built on transformers' `DynamicCache`: each full-attention layer with such heads becomes an `ImageFreeLayer`, which
keeps the other key/value heads whole and these at text positions only (prompt text, padding and every generated
token). Sliding-window and linear-attention layers keep their own cache layers. The cache only works inside the
`ablate` context that made it (`ablate.cache()`): the layer hands the attention function its two parts, which the
context routes to the image-free attention, instead of one dense key tensor.
"""

from __future__ import annotations

from typing import Any

import torch

from vheads.capture.session import CaptureError
from vheads.compat import DynamicCache, DynamicLayer


class Prompt:
    """What the layers of one `ImageFreeCache` share: the prompt's image flags [batch, prompt] and whether the
    context that routes the cache's parts is active."""

    def __init__(self) -> None:
        self.image: torch.Tensor | None = None
        self.active = False


class ImageFreeLayer(DynamicLayer):
    """One layer's cache: key/value heads `keep` at every position (`keys`, `values`: [batch, len(keep), seq, d]),
    the others at text positions only (`text_keys`, `text_values`: [batch, n, slots, d]; `text_index` [batch,
    slots] their positions, `text_valid` [batch, slots] False for the slots that pad rows with fewer text tokens)."""

    def __init__(self, keep: list[int], kv_heads: int, prompt: Prompt):
        super().__init__()
        self.keep = list(keep)
        self.drop = [h for h in range(kv_heads) if h not in self.keep]
        self.kv_heads = kv_heads
        self.prompt = prompt
        self.text_keys: torch.Tensor | None = None
        self.text_values: torch.Tensor | None = None
        self.text_index: torch.Tensor | None = None
        self.text_valid: torch.Tensor | None = None
        self.length = 0

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any,
               **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """Store the step's keys and values; return them as they are on prefill (the dense ones exist anyway), and
        on decode a zero-stride placeholder of the dense shape (the attention function reads the parts)."""
        if not self.prompt.active:
            raise CaptureError("an ImageFreeCache works only inside the ablate context that made it")
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        b, _, steps, d = key_states.shape
        keep_k, keep_v = key_states[:, self.keep], value_states[:, self.keep]
        drop_k, drop_v = key_states[:, self.drop], value_states[:, self.drop]
        if self.length == 0:
            index, valid = text_slots(self.prompt.image, steps, key_states.device)
            gather = index[:, None, :, None].expand(-1, len(self.drop), -1, d)
            self.keys, self.values = keep_k, keep_v
            self.text_keys, self.text_values = torch.gather(drop_k, 2, gather), torch.gather(drop_v, 2, gather)
            self.text_index, self.text_valid = index, valid
            self.length = steps
            return key_states, value_states
        new = torch.arange(self.length, self.length + steps, device=key_states.device).expand(b, -1)
        self.keys = torch.cat([self.keys, keep_k], dim=-2)
        self.values = torch.cat([self.values, keep_v], dim=-2)
        self.text_keys = torch.cat([self.text_keys, drop_k], dim=-2)
        self.text_values = torch.cat([self.text_values, drop_v], dim=-2)
        self.text_index = torch.cat([self.text_index, new], dim=1)
        self.text_valid = torch.cat([self.text_valid, torch.ones_like(new, dtype=torch.bool)], dim=1)
        self.length += steps
        shape = (b, self.kv_heads, self.length, d)
        return key_states.new_zeros(()).expand(shape), value_states.new_zeros(()).expand(shape)

    def get_seq_length(self) -> int:
        """Positions seen so far (the image-free heads hold fewer)."""
        return self.length

    def dense(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values [batch, kv_heads, seq, d] with zeros where the image-free heads hold nothing (for observers,
        which read only the heads' allowed keys)."""
        b, _, _, d = self.keys.shape
        rows, slots = torch.nonzero(self.text_valid, as_tuple=True)
        positions = self.text_index[rows, slots]
        out = []
        for whole, text in ((self.keys, self.text_keys), (self.values, self.text_values)):
            full = whole.new_zeros(b, self.kv_heads, self.length, d)
            full[:, self.keep] = whole
            dropped = full[:, self.drop].transpose(1, 2)  # [batch, seq, n, d]
            dropped[rows, positions] = text.transpose(1, 2)[rows, slots]
            full[:, self.drop] = dropped.transpose(1, 2)
            out.append(full)
        return out[0], out[1]

    def nbytes(self) -> int:
        """Bytes the layer holds."""
        return sum(t.numel() * t.element_size() for t in (self.keys, self.values, self.text_keys, self.text_values,
                                                          self.text_index, self.text_valid) if t is not None)

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("an ImageFreeCache cannot be cropped")

    def batch_repeat_interleave(self, repeats: int) -> None:
        raise NotImplementedError("an ImageFreeCache cannot be expanded (beam search, several samples per prompt)")

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        """Keep the batch rows `indices`."""
        self._select(indices)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Reorder the batch rows (beam search)."""
        self._select(beam_idx)

    def _select(self, rows: torch.Tensor) -> None:
        if self.length == 0:
            return
        for name in ("keys", "values", "text_keys", "text_values", "text_index", "text_valid"):
            tensor = getattr(self, name)
            setattr(self, name, tensor[rows.to(tensor.device)])


def text_slots(image: torch.Tensor | None, length: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The non-image positions of each row of a prompt of `length` tokens, left-aligned and padded to the longest row:
    index [batch, slots] and valid [batch, slots]."""
    if image is None:
        raise CaptureError("the ImageFreeCache saw no prefill: image positions come from the forward's input_ids")
    text = ~image.to(device)[:, :length]
    counts = text.sum(dim=1)
    slots = int(counts.max()) if counts.numel() else 0
    index = torch.argsort((~text).to(torch.int8), dim=1, stable=True)[:, :slots]
    valid = torch.arange(slots, device=device)[None, :] < counts[:, None]
    return index, valid


class ImageFreeCache(DynamicCache):
    """A `DynamicCache` whose full-attention layers listed in `keep` (layer -> key/value heads that keep the image)
    hold the other key/value heads without the image's positions. Made by `ablate.cache()`."""

    def __init__(self, config: Any, keep: dict[int, list[int]], kv_heads: int):
        super().__init__(config=config)
        self.prompt = Prompt()
        self.image_free: list[int] = []
        for layer, heads in keep.items():
            if len(heads) < kv_heads and layer < len(self.layers) and type(self.layers[layer]) is DynamicLayer:
                self.layers[layer] = ImageFreeLayer(heads, kv_heads, self.prompt)
                self.image_free.append(layer)


def cache_bytes(cache: Any, image: torch.Tensor | None = None) -> dict[str, int]:
    """Bytes of keys and values a cache holds: `total`, and `image` (those at image positions), per the prompt's image
    flags [batch, prompt] (an `ImageFreeCache` knows its own). Works for any `DynamicCache`; a sliding-window layer
    holds only its window's last positions."""
    if image is None:
        image = getattr(getattr(cache, "prompt", None), "image", None)
    total = held_image = 0
    for layer in cache.layers:
        keys = getattr(layer, "keys", None)
        if isinstance(layer, ImageFreeLayer):
            total += layer.nbytes()
            per_position = 2 * layer.keys.shape[1] * layer.keys.shape[-1] * layer.keys.element_size()
            held_image += per_position * int(image.sum()) if image is not None and layer.length else 0
            continue
        if not isinstance(keys, torch.Tensor) or keys.numel() == 0:
            continue
        total += keys.numel() * keys.element_size() + layer.values.numel() * layer.values.element_size()
        if image is not None:
            held, seen = keys.shape[-2], max(layer.get_seq_length(), keys.shape[-2], image.shape[1])
            flags = torch.nn.functional.pad(image, (0, seen - image.shape[1]))[:, seen - held: seen]
            held_image += 2 * keys.shape[1] * keys.shape[-1] * keys.element_size() * int(flags.sum())
    return {"total": total, "image": held_image}
