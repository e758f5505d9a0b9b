"""Attention with some keys taken out of some heads' softmax: the math behind image-blind, flow-blind and FastV.

A key mask is `(heads, blocked)`: query heads (None: every head) and a bool tensor [batch, 1 or q, kv] of the keys
those heads may not see, on top of what the layer's own mask hides. The blocked keys leave the softmax, which
renormalises over the rest; a row left with no key gives 0 (never NaN). Heads are run in whole key/value groups
so the module's grouped-query ratio holds for the kernel.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from vheads.compat import attention_function, eager_kernel

KeyMask = tuple[list[int] | None, torch.Tensor]


def blocked_by_head(key_masks: list[KeyMask], heads: int) -> list[tuple[list[int], torch.Tensor]]:
    """Group the query heads that share the same blocked keys: [(heads, blocked [batch, 1 or q, kv])], the blocked
    keys of each group the union of the masks that name its heads. Masks that block nothing are left out."""
    live = [(None if names is None else set(names), blocked) for names, blocked in key_masks if bool(blocked.any())]
    groups: dict[tuple[int, ...], list[int]] = {}
    for head in range(heads):
        which = tuple(i for i, (names, _) in enumerate(live) if names is None or head in names)
        if which:
            groups.setdefault(which, []).append(head)
    out = []
    for which, members in groups.items():
        blocked = live[which[0]][1]
        for i in which[1:]:
            blocked = blocked | live[i][1]
        out.append((members, blocked))
    return out


def whole_groups(heads: list[int], group: int) -> tuple[list[int], list[int]]:
    """The key/value heads serving `heads`, and every query head of those key/value heads, in order."""
    kv = sorted({head // group for head in heads})
    return kv, [k * group + g for k in kv for g in range(group)]


def kernel_mask(allowed: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype, additive: bool) -> torch.Tensor:
    """A 4D mask [batch, 1, q, kv] for a kernel from the allowed keys [batch, q, kv]: bool (sdpa), or additive with
    the layer's own bias kept where allowed (eager kernels)."""
    if not additive:
        return allowed[:, None]
    base = bias.to(dtype) if bias is not None else torch.zeros(allowed.shape, dtype=dtype, device=allowed.device)
    return base.masked_fill(~allowed, torch.finfo(dtype).min)[:, None]


def explicit_kernel(module: torch.nn.Module, base: str, kwargs: dict[str, Any]) -> tuple[Callable, bool]:
    """The kernel that takes an explicit per-row mask: the family's eager kernel where the model runs eager or the
    layer soft-caps / has sinks (sdpa can do neither), else sdpa (flash kernels take no such mask). Returns the
    kernel and whether its mask is additive."""
    if base == "eager" or kwargs.get("softcap") or kwargs.get("s_aux") is not None:
        fn = eager_kernel(module)
        if fn is not None:
            return fn, True
    return attention_function("sdpa"), False


def attend_blocked(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                   allowed: torch.Tensor, bias: torch.Tensor | None, base: str,
                   kwargs: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """softmax over the `allowed` keys [batch, q, kv] only, for every head of `query` [batch, h, q, d] with its
    key/value heads `key`/`value` [batch, kvh, kv, d]: output [batch, q, h, d], rows with no allowed key 0; the
    weights [batch, h, q, kv] where the kernel returns them."""
    fn, additive = explicit_kernel(module, base, kwargs)
    mask = kernel_mask(allowed, bias, query.dtype, additive)
    out, weights = fn(module, query, key, value, mask, **kwargs)
    empty = ~allowed.any(dim=-1)  # [batch, q]
    if bool(empty.any()):
        out = out.masked_fill(empty[:, :, None, None], 0.0)
        if isinstance(weights, torch.Tensor) and weights.dim() == 4:
            weights = weights.masked_fill(empty[:, None, :, None], 0.0)
    return out, weights


def apply_key_masks(call: Any, base: str, kernel: Callable) -> tuple[torch.Tensor, Any]:
    """The layer's output [batch, q, h, d] with `call.key_masks` applied: the heads no mask names run the base
    `kernel` (on their whole key/value groups only), each group of heads that share blocked keys runs on its whole
    key/value groups under the explicit mask, and the outputs are put together (weights where kernels return them)."""
    b, h, q_len, d = call.query.shape
    groups = blocked_by_head(call.key_masks, h)
    if not groups:
        return kernel(call.module, call.query, call.key, call.value, call.mask, **call.kwargs)
    group = h // call.key.shape[1]
    masked = {head for heads, _ in groups for head in heads}
    plain = [head for head in range(h) if head not in masked]
    parts = []
    if plain:
        kv, q_heads = whole_groups(plain, group)
        part, part_weights = kernel(call.module, call.query[:, q_heads], call.key[:, kv], call.value[:, kv], call.mask,
                                    **call.kwargs)
        parts.append((plain, q_heads, part, part_weights))
    rows = torch.arange(q_len, device=call.query.device).expand(b, -1)
    visible, bias = call.visible(rows)
    for heads, blocked in groups:
        kv, q_heads = whole_groups(heads, group)
        part, part_weights = attend_blocked(call.module, call.query[:, q_heads], call.key[:, kv], call.value[:, kv],
                                            visible & ~blocked, bias, base, call.kwargs)
        parts.append((heads, q_heads, part, part_weights))
    out = parts[0][2].new_empty(b, q_len, h, d)
    with_weights = all(isinstance(w, torch.Tensor) and w.dim() == 4 for *_, w in parts)
    weights = parts[0][3].new_zeros(b, h, q_len, parts[0][3].shape[-1]) if with_weights else None
    for heads, q_heads, part, part_weights in parts:
        pick = [q_heads.index(head) for head in heads]
        out[:, :, heads] = part[:, :, pick]
        if weights is not None:
            weights[:, heads] = part_weights[:, pick].to(weights.dtype)
    return out, weights


def _sub_call(call: Any, heads: list[int], key: torch.Tensor, value: torch.Tensor, mask: Any = None,
              index: torch.Tensor | None = None) -> Any:
    """The call restricted to query heads `heads` (whole key/value groups) and keys `key` / `value`, its key masks
    renumbered (and gathered at key positions `index` [batch, slots] when the keys are a gathered subset)."""
    masks = []
    for names, blocked in call.key_masks:
        local = None if names is None else [heads.index(name) for name in names if name in heads]
        if local == []:
            continue
        if index is not None:
            blocked = torch.gather(blocked, 2, index[:, None, :].expand(-1, blocked.shape[1], -1))
        masks.append((local, blocked))
    return type(call)(call.layer, call.module, call.query[:, heads], key, value,
                      call.mask if index is None else mask, call.kwargs, [], masks)


def attend_pruned(call: Any, layer: Any, base: str, kernel: Callable) -> tuple[torch.Tensor, None]:
    """The layer's output when its cache (`pruned_cache.PrunedLayer`) holds some key/value heads without some prompt
    positions (the image's, or FastV's dropped tokens): the query heads of the whole key/value heads run the base
    kernel (with their key masks, if any); the others run on the held keys alone, with the layer's mask and the key
    masks gathered the same way, so they never touch the hidden tokens. On prefill a key mask that differs by row
    (flow-blind: image rows still see the image) runs those heads on the dense keys."""
    b, h, q_len, d = call.query.shape
    group = h // layer.kv_heads
    prefill = layer.length == q_len
    out = call.query.new_empty(b, q_len, h, d)
    _, whole = whole_groups([k * group for k in layer.keep], group)
    _, pruned = whole_groups([k * group for k in layer.drop], group)
    if whole:
        keys, values = (call.key[:, layer.keep], call.value[:, layer.keep]) if prefill else (layer.keys, layer.values)
        part, _ = apply_key_masks(_sub_call(call, whole, keys, values), base, kernel)
        out[:, :, whole] = part.to(out.dtype)
    by_row = any(blocked.shape[1] > 1 for names, blocked in call.key_masks
                 if names is None or set(names) & set(pruned))
    if prefill and by_row:
        sub = _sub_call(call, pruned, call.key[:, layer.drop], call.value[:, layer.drop])
        part, _ = apply_key_masks(sub, base, kernel)
    else:
        rows = torch.arange(q_len, device=call.query.device).expand(b, -1)
        visible, bias = call.visible(rows)
        index = layer.held_index[:, None, :].expand(-1, q_len, -1)
        allowed = torch.gather(visible, 2, index) & layer.held_valid[:, None, :]
        bias = None if bias is None else torch.gather(bias, 2, index)
        explicit, additive = explicit_kernel(call.module, base, call.kwargs)
        mask = kernel_mask(allowed, bias, call.query.dtype, additive)
        sub = _sub_call(call, pruned, layer.held_keys, layer.held_values, mask, layer.held_index)
        part, _ = apply_key_masks(sub, base, explicit)
        part = part.masked_fill(~allowed.any(dim=-1)[:, :, None, None], 0.0)
    out[:, :, pruned] = part.to(out.dtype)
    return out, None
