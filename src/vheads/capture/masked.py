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


def apply_key_masks(call: Any, base: str, out: torch.Tensor | None, weights: Any,
                    kernel: Callable) -> tuple[torch.Tensor, Any]:
    """The layer's output with `call.key_masks` applied: each group of heads sharing blocked keys recomputed on its
    whole key/value groups with the explicit mask, spliced into the base kernel's output (`out`, [batch, q, h, d];
    None: not run yet, and not run at all when one group covers every head)."""
    b, h, q_len, _ = call.query.shape
    groups = blocked_by_head(call.key_masks, h)
    if not groups:
        if out is None:
            out, weights = kernel(call.module, call.query, call.key, call.value, call.mask, **call.kwargs)
        return out, weights
    if out is None and not (len(groups) == 1 and len(groups[0][0]) == h):
        out, weights = kernel(call.module, call.query, call.key, call.value, call.mask, **call.kwargs)
    rows = torch.arange(q_len, device=call.query.device).expand(b, -1)
    visible, bias = call.visible(rows)
    group = h // call.key.shape[1]
    spliced = False
    for heads, blocked in groups:
        kv, q_heads = whole_groups(heads, group)
        part, part_weights = attend_blocked(call.module, call.query[:, q_heads], call.key[:, kv], call.value[:, kv],
                                            visible & ~blocked, bias, base, call.kwargs)
        pick = [q_heads.index(head) for head in heads]
        if out is None:
            out = part[:, :, pick]
            weights = part_weights[:, pick] if isinstance(part_weights, torch.Tensor) else part_weights
            continue
        if not spliced:
            out, spliced = out.clone(), True
            weights = weights.clone() if isinstance(weights, torch.Tensor) else weights
        out[:, :, heads] = part[:, :, pick].to(out.dtype)
        if isinstance(weights, torch.Tensor) and weights.dim() == 4 and isinstance(part_weights, torch.Tensor):
            weights[:, heads] = part_weights[:, pick].to(weights.dtype)
    return out, weights


def _sub_call(call: Any, heads: list[int], key: torch.Tensor, value: torch.Tensor) -> Any:
    """The call restricted to query heads `heads` (whole key/value groups) and their keys, its key masks renumbered."""
    masks = []
    for names, blocked in call.key_masks:
        if names is None:
            masks.append((None, blocked))
            continue
        local = [heads.index(name) for name in names if name in heads]
        if local:
            masks.append((local, blocked))
    return type(call)(call.layer, call.module, call.query[:, heads], key, value, call.mask, call.kwargs, [], masks)


def attend_image_free(call: Any, layer: Any, base: str, kernel: Callable) -> tuple[torch.Tensor, None]:
    """The layer's output when its cache (`image_cache.ImageFreeLayer`) holds some key/value heads without the image:
    the query heads of the whole key/value heads run the base kernel (their image-blind heads, if any, with the key
    mask); the others run on the text keys alone, gathered with the layer's mask, so they never touch the image.
    On prefill a mask that differs by row (flow-blind: image rows still see the image) runs on the dense keys."""
    b, h, q_len, d = call.query.shape
    group = h // layer.kv_heads
    prefill = layer.length == q_len
    out = call.query.new_empty(b, q_len, h, d)
    _, whole = whole_groups([k * group for k in layer.keep], group)
    _, text_only = whole_groups([k * group for k in layer.drop], group)
    if whole:
        keys, values = (call.key[:, layer.keep], call.value[:, layer.keep]) if prefill else (layer.keys, layer.values)
        part, _ = apply_key_masks(_sub_call(call, whole, keys, values), base, None, None, kernel)
        out[:, :, whole] = part.to(out.dtype)
    by_row = any(blocked.shape[1] > 1 for names, blocked in call.key_masks
                 if names is None or set(names) & set(text_only))
    if prefill and by_row:
        sub = _sub_call(call, text_only, call.key[:, layer.drop], call.value[:, layer.drop])
        part, _ = apply_key_masks(sub, base, None, None, kernel)
    else:
        rows = torch.arange(q_len, device=call.query.device).expand(b, -1)
        visible, bias = call.visible(rows)
        index = layer.text_index[:, None, :].expand(-1, q_len, -1)
        allowed = torch.gather(visible, 2, index) & layer.text_valid[:, None, :]
        bias = None if bias is None else torch.gather(bias, 2, index)
        part, _ = attend_blocked(call.module, call.query[:, text_only], layer.text_keys, layer.text_values, allowed,
                                 bias, base, call.kwargs)
    out[:, :, text_only] = part.to(out.dtype)
    return out, None
