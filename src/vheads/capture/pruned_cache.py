"""`PrunedCache`: a KV cache whose layers do not hold some tokens' keys and values for some key/value heads, and
`cache_bytes`, what a cache holds.

Built on transformers' `DynamicCache`: a full-attention layer becomes a `PrunedLayer`, which keeps some key/value
heads whole and the others (the pruned heads) without the hidden prompt positions: the image's for the key/value
heads whose query heads are all image-blind (`ablate.cache()`), the image tokens FastV dropped for every head of
the layers from K on (`fastv.cache()`). Generated tokens are always held. Sliding-window and linear-attention layers
keep their own cache layers. The cache works only inside the context that made it: the layer hands the attention
function its two parts (`capture.masked.attend_pruned`), not one dense key tensor.
"""

from __future__ import annotations

from typing import Any

import torch

from vheads.capture.session import CaptureError
from vheads.compat import DynamicCache, DynamicLayer, forward_cache


class Prompt:
    """What the layers of one `PrunedCache` share: the prompt's image flags and the positions each rule hides
    (bool [batch, prompt]: `hidden["image"]`, `hidden["dropped"]`), and whether the context that routes the cache's
    parts is active."""

    def __init__(self) -> None:
        self.image: torch.Tensor | None = None
        self.hidden: dict[str, torch.Tensor] = {}
        self.active = False


class PrunedLayer(DynamicLayer):
    """One layer's cache: key/value heads `keep` at every position (`keys`, `values`: [batch, len(keep), seq, d]),
    the others at the positions the rule `hides` leaves (`held_keys`, `held_values`: [batch, n, slots, d];
    `held_index` [batch, slots] their positions, `held_valid` [batch, slots] False for the slots that pad rows which
    hold fewer)."""

    def __init__(self, keep: list[int], kv_heads: int, prompt: Prompt, hides: str):
        super().__init__()
        self.keep = list(keep)
        self.drop = [h for h in range(kv_heads) if h not in self.keep]
        self.kv_heads = kv_heads
        self.prompt = prompt
        self.hides = hides
        self.held_keys: torch.Tensor | None = None
        self.held_values: torch.Tensor | None = None
        self.held_index: torch.Tensor | None = None
        self.held_valid: torch.Tensor | None = None
        self.length = 0

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any,
               **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """Store the step's keys and values; return them as they are on prefill (the dense ones exist anyway), and
        on decode a zero-stride placeholder of the dense shape (the attention function reads the parts)."""
        if not self.prompt.active:
            raise CaptureError("a PrunedCache works only inside the ablate / fastv context that made it")
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        b, _, steps, d = key_states.shape
        keep_k, keep_v = key_states[:, self.keep], value_states[:, self.keep]
        drop_k, drop_v = key_states[:, self.drop], value_states[:, self.drop]
        if self.length == 0:
            hidden = self.prompt.hidden.get(self.hides)
            if hidden is None:
                raise CaptureError(f"the PrunedCache has no {self.hides} positions for layer prefill")
            index, valid = held_slots(hidden, steps, key_states.device)
            gather = index[:, None, :, None].expand(-1, len(self.drop), -1, d)
            self.keys, self.values = keep_k, keep_v
            self.held_keys, self.held_values = torch.gather(drop_k, 2, gather), torch.gather(drop_v, 2, gather)
            self.held_index, self.held_valid = index, valid
            self.length = steps
            return key_states, value_states
        new = torch.arange(self.length, self.length + steps, device=key_states.device).expand(b, -1)
        self.keys = torch.cat([self.keys, keep_k], dim=-2)
        self.values = torch.cat([self.values, keep_v], dim=-2)
        self.held_keys = torch.cat([self.held_keys, drop_k], dim=-2)
        self.held_values = torch.cat([self.held_values, drop_v], dim=-2)
        self.held_index = torch.cat([self.held_index, new], dim=1)
        self.held_valid = torch.cat([self.held_valid, torch.ones_like(new, dtype=torch.bool)], dim=1)
        self.length += steps
        shape = (b, self.kv_heads, self.length, d)
        return key_states.new_zeros(()).expand(shape), value_states.new_zeros(()).expand(shape)

    def get_seq_length(self) -> int:
        """Positions seen so far (the pruned heads hold fewer)."""
        return self.length

    def dense(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values [batch, kv_heads, seq, d] with zeros where the pruned heads hold nothing (for observers,
        which read only the keys the heads may see)."""
        b, _, _, d = self.keys.shape
        rows, slots = torch.nonzero(self.held_valid, as_tuple=True)
        positions = self.held_index[rows, slots]
        out = []
        for whole, text in ((self.keys, self.held_keys), (self.values, self.held_values)):
            full = whole.new_zeros(b, self.kv_heads, self.length, d)
            full[:, self.keep] = whole
            dropped = full[:, self.drop].transpose(1, 2)  # [batch, seq, n, d]
            dropped[rows, positions] = text.transpose(1, 2)[rows, slots]
            full[:, self.drop] = dropped.transpose(1, 2)
            out.append(full)
        return out[0], out[1]

    def nbytes(self) -> int:
        """Bytes the layer holds."""
        return sum(t.numel() * t.element_size() for t in (self.keys, self.values, self.held_keys, self.held_values,
                                                          self.held_index, self.held_valid) if t is not None)

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("a PrunedCache cannot be cropped")

    def batch_repeat_interleave(self, repeats: int) -> None:
        raise NotImplementedError("a PrunedCache cannot be expanded (beam search, several samples per prompt)")

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        """Keep the batch rows `indices`."""
        self._select(indices)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Reorder the batch rows (beam search)."""
        self._select(beam_idx)

    def _select(self, rows: torch.Tensor) -> None:
        if self.length == 0:
            return
        for name in ("keys", "values", "held_keys", "held_values", "held_index", "held_valid"):
            tensor = getattr(self, name)
            setattr(self, name, tensor[rows.to(tensor.device)])


def held_slots(hidden: torch.Tensor, length: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The positions of each row of a prompt of `length` tokens that are not `hidden` [batch, prompt], in order and
    padded to the row that holds most: index [batch, slots] and valid [batch, slots]."""
    held = ~hidden.to(device)[:, :length]
    counts = held.sum(dim=1)
    slots = int(counts.max()) if counts.numel() else 0
    index = torch.argsort((~held).to(torch.int8), dim=1, stable=True)[:, :slots]
    valid = torch.arange(slots, device=device)[None, :] < counts[:, None]
    return index, valid


class PrunedCache(DynamicCache):
    """A `DynamicCache` whose full-attention layers named in `keep` (layer -> the key/value heads kept whole) hold
    their other key/value heads without the prompt positions of rule `hides` ("image": the image tokens, "dropped":
    those FastV dropped). `pruned` lists the layers that became `PrunedLayer`s (the others keep their own layers).
    Made by `ablate.cache()` and `fastv.cache()`."""

    def __init__(self, config: Any, keep: dict[int, list[int]], kv_heads: int, hides: str):
        super().__init__(config=config)
        self.prompt = Prompt()
        self.pruned: list[int] = []
        for layer, heads in keep.items():
            if len(heads) < kv_heads and layer < len(self.layers) and type(self.layers[layer]) is DynamicLayer:
                self.layers[layer] = PrunedLayer(heads, kv_heads, self.prompt, hides)
                self.pruned.append(layer)

    def runs(self, kwargs: dict[str, Any]) -> bool:
        """Whether a forward with keyword arguments `kwargs` runs on this cache."""
        return forward_cache(kwargs) is self

    def pruned_layer(self, layer: int) -> PrunedLayer | None:
        """Layer `layer`'s cache when it is a `PrunedLayer`, else None."""
        found = self.layers[layer] if layer < len(self.layers) else None
        return found if isinstance(found, PrunedLayer) else None


def cache_bytes(cache: Any, image: torch.Tensor | None = None) -> dict[str, int]:
    """Bytes of keys and values a cache holds: `total`, and `image` (those at image positions), per the prompt's image
    flags [batch, prompt] (a `PrunedCache` knows its own). Works for any `DynamicCache`; a sliding-window layer
    holds only its window's last positions."""
    if image is None:
        image = getattr(getattr(cache, "prompt", None), "image", None)
    total = held_image = 0
    for layer in cache.layers:
        keys = getattr(layer, "keys", None)
        if isinstance(layer, PrunedLayer):
            total += layer.nbytes()
            if image is not None and layer.length:
                per_head = 2 * layer.keys.shape[-1] * layer.keys.element_size()
                flags = torch.nn.functional.pad(image.to(layer.held_index.device), (0, layer.length - image.shape[1]))
                held = int((torch.gather(flags, 1, layer.held_index) & layer.held_valid).sum())
                held_image += per_head * (len(layer.keep) * int(image.sum()) + len(layer.drop) * held)
            continue
        if not isinstance(keys, torch.Tensor) or keys.numel() == 0:
            continue
        total += keys.numel() * keys.element_size() + layer.values.numel() * layer.values.element_size()
        if image is not None:
            held, seen = keys.shape[-2], max(layer.get_seq_length(), keys.shape[-2], image.shape[1])
            flags = torch.nn.functional.pad(image, (0, seen - image.shape[1]))[:, seen - held: seen]
            held_image += 2 * keys.shape[1] * keys.shape[-1] * keys.element_size() * int(flags.sum())
    return {"total": total, "image": held_image}
