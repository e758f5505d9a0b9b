"""The one attention function vheads registers with transformers, and its lifetime on a model.

A `CaptureSession` is the callable registered in `AttentionInterface` (under a name unique to the session)
while any recorder or ablation is active on a model. It runs the kernel the language model was loaded
with (sdpa, flash attention, eager, ...), with the keys the active ablations take out of some heads'
softmax (`capture.masked`), then zeroes or flattens ablated heads and hands the layer's query / key
to the active recorders, which recompute only the rows they read. The language model's config is pointed
at the session's name on entry and restored on exit; the vision tower is never touched. A mask function
is registered under the same name, so padded batches keep their masks.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from vheads.capture.masked import apply_key_masks, attend_pruned
from vheads.compat import (
    attention_function,
    attention_implementation,
    eager_kernel,
    register_attention,
    registered_attention,
    set_attention_implementation,
    unregister_attention,
)
from vheads.models.layers import LayerError, language_layers

PREFIX = "vheads_"
_ids = itertools.count()


class CaptureError(RuntimeError):
    """The model cannot be captured (no language model found, no input ids, ...)."""


class AttentionCall:
    """The inputs of one attention call of one language-model layer, as the observers see them."""

    __slots__ = ("layer", "module", "query", "key", "value", "mask", "kwargs", "uniform_heads", "key_masks")

    def __init__(self, layer, module, query, key, value, mask, kwargs, uniform_heads, key_masks=()):
        self.layer: int = layer
        self.module: nn.Module = module
        self.query: torch.Tensor = query
        self.key: torch.Tensor = key
        self.value: torch.Tensor = value
        self.mask: torch.Tensor | None = mask
        self.kwargs: dict[str, Any] = kwargs
        self.uniform_heads: list[int] = uniform_heads
        # (heads or None for all, blocked [batch, 1 or q, kv] bool): keys taken out of those heads' softmax
        self.key_masks: list[tuple[list[int] | None, torch.Tensor]] = list(key_masks)

    @property
    def scaling(self) -> float:
        """The softmax scale the layer uses (the kernel default 1/sqrt(d) when the module passes none)."""
        s = self.kwargs.get("scaling")
        return float(s) if s is not None else self.query.shape[-1] ** -0.5

    def visible(self, rows: torch.Tensor | int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Which keys each selected query row may see, and an additive bias (float masks), per batch row.

        `rows` is [batch, r] query indices within this call, or one index shared by every batch row (the
        usual case: with left padding the prompt readout is the last position of every row); returns bool
        [batch, r, kv] and a float bias [batch, r, kv] or None. Handles the masks of every kernel: 4D bool
        (sdpa), 4D additive (eager), 2D padding (flash attention) and None (causal, unpadded).
        """
        b, _, q_len, _ = self.query.shape
        kv_len = self.key.shape[2]
        device = self.key.device
        shared = isinstance(rows, int)
        if not shared:
            rows = rows.to(device)
        m = self.mask
        bias = None
        if m is not None and m.dim() == 4:
            if shared:
                row = rows if m.shape[2] > 1 else 0
                picked = m[:, 0, row: row + 1, :kv_len].expand(b, -1, -1)
            else:
                m = m[:, 0].expand(b, q_len, -1)
                picked = torch.gather(m, 1, rows[..., None].expand(-1, -1, m.shape[-1]))[..., :kv_len]
            if picked.dtype == torch.bool:
                return picked, None
            bias = picked.float()
            return bias > torch.finfo(bias.dtype).min / 2, bias
        k_idx = torch.arange(kv_len, device=device)
        q_abs = (torch.full((b, 1), rows, device=device) if shared else rows) + (kv_len - q_len)
        causal = getattr(self.module, "is_causal", True)
        vis = (k_idx <= q_abs[..., None]) if causal else torch.ones(b, q_abs.shape[1], kv_len, dtype=torch.bool,
                                                                      device=device)
        window = self.kwargs.get("sliding_window")
        if window:
            vis = vis & (k_idx > q_abs[..., None] - window)
        if m is not None and m.dim() == 2:
            vis = vis & m[:, None, -kv_len:].bool()
        return vis.expand(b, -1, -1), bias

    def probabilities(self, rows: torch.Tensor | int) -> torch.Tensor:
        """softmax(q·kᵀ·scale + mask) in fp32 for the selected query rows only: [batch, heads, r, kv].

        `rows` as in `visible`: [batch, r] indices, or one index shared by every batch row.
        """
        b, h, _, d = self.query.shape
        kvh = self.key.shape[1]
        if isinstance(rows, int):
            q = self.query[:, :, rows: rows + 1].float()
        else:
            rows = rows.to(self.query.device)
            q = torch.gather(self.query, 2, rows[:, None, :, None].expand(b, h, -1, d)).float()
        r = q.shape[2]
        q = q.reshape(b, kvh, (h // kvh) * r, d) * self.scaling
        logits = torch.matmul(q, self.key.float().transpose(-1, -2)).reshape(b, h, r, -1)
        softcap = self.kwargs.get("softcap")
        if softcap:
            logits = torch.tanh(logits / softcap) * softcap
        vis, bias = self.visible(rows)
        if bias is not None:
            logits = logits + bias[:, None]
        logits = torch.where(vis[:, None], logits, float("-inf"))
        for heads, blocked in self.key_masks:
            if blocked.shape[1] > 1:
                index = (torch.full((b, 1), rows) if isinstance(rows, int) else rows).to(blocked.device)
                blocked = torch.gather(blocked, 1, index[..., None].expand(-1, -1, blocked.shape[-1]))
            picked = slice(None) if heads is None else heads
            logits[:, picked] = logits[:, picked].masked_fill(blocked[:, None].to(logits.device), float("-inf"))
        sinks = self.kwargs.get("s_aux")
        if sinks is not None:
            sink = sinks.float().reshape(1, h, 1, 1).expand(b, -1, r, 1)
            probs = torch.softmax(torch.cat([logits, sink], dim=-1), dim=-1)[..., :-1]
        else:
            probs = torch.softmax(logits, dim=-1)
        probs = torch.nan_to_num(probs, nan=0.0)
        if self.uniform_heads:
            uniform = vis.float() / vis.sum(-1, keepdim=True).clamp(min=1)
            probs[:, self.uniform_heads] = uniform[:, None]
        return probs


def _language_layers(model: nn.Module) -> tuple[list[nn.Module | None], list[Any]]:
    """`models.layers.language_layers`, its failure raised as a `CaptureError`."""
    try:
        return language_layers(model)
    except LayerError as exc:
        raise CaptureError(str(exc)) from None


class Observer:
    """Attach to the model's `CaptureSession` on entry, leave it (restoring the model when last) on exit.

    The one observer contract: a session calls `on_forward` before every forward of the model (with its keyword
    arguments) and `observe` with every language-model attention call; `HeadRecorder` (figures) and
    `TokenAttention` (per-token maps) implement it.
    """

    model: nn.Module
    session: CaptureSession | None = None

    def __enter__(self) -> Any:
        self.session = CaptureSession.attach(self.model)
        self.session.observers.append(self)
        return self

    def __exit__(self, *exc: Any) -> None:
        session, self.session = self.session, None
        if session is not None:
            session.observers.remove(self)
            session.detach()

    def on_forward(self, session: CaptureSession, kwargs: dict[str, Any]) -> None:
        """Called before each forward of the model."""
        raise NotImplementedError

    def observe(self, call: AttentionCall) -> None:
        """Called with each language-model attention call."""
        raise NotImplementedError


class Ablation:
    """What a session asks of each active ablation (`ablate`, `fastv`): `mode`, the heads it zeroes or flattens
    (`heads_by_layer`, for modes `zero` / `uniform`), and four calls, each a no-op here.

    `on_forward` before every forward (with its keyword arguments); `key_masks(call)` the keys it takes out of
    which heads' softmax in this call (`capture.masked.KeyMask`s); `cache_layer(call)` the `PrunedLayer` behind the
    call's keys when the forward runs on a cache the ablation made; `after(call)` once the call's output exists.
    """

    mode: str = ""
    heads_by_layer: dict[int, list[int]]

    def on_forward(self, session: CaptureSession, kwargs: dict[str, Any]) -> None:
        """Called before each forward of the model."""

    def key_masks(self, call: AttentionCall) -> list[tuple[list[int] | None, torch.Tensor]]:
        """Keys taken out of some heads' softmax in this call: (heads or None for all, blocked [batch, 1 or q, kv])."""
        return []

    def cache_layer(self, call: AttentionCall) -> Any:
        """The pruned cache layer holding this call's keys, or None."""
        return None

    def after(self, call: AttentionCall) -> None:
        """Called with each attention call once its output is computed."""


class CaptureSession:
    """The attention function registered for one model while vheads contexts are active on it."""

    def __init__(self, model: nn.Module, layers: tuple[list[nn.Module | None], list[Any]] | None = None):
        self.model = model
        self.attention, self.configs = layers if layers is not None else _language_layers(model)
        self.layer_of = {id(m): i for i, m in enumerate(self.attention) if m is not None}
        self.attention_layers = sorted(self.layer_of.values())  # all layers, except in hybrid decoders
        self.base = attention_implementation(self.configs[0])
        if self.base.startswith(PREFIX):
            raise CaptureError("the model is already routed through another vheads session")
        self.name = f"{PREFIX}{self.base}_{next(_ids)}"
        self.observers: list[Observer] = []
        self.ablations: list[Ablation] = []
        self.users = 0
        self._hook = None

    @property
    def num_layers(self) -> int:
        """Language-model layers."""
        return len(self.attention)

    @property
    def num_heads(self) -> int:
        """Query heads per language-model layer."""
        return int(self.configs[0].num_attention_heads)

    @classmethod
    def attach(cls, model: nn.Module) -> CaptureSession:
        """The session active on `model`, or a new one routed in now."""
        layers = _language_layers(model)
        current = registered_attention(attention_implementation(layers[1][0]))
        if isinstance(current, CaptureSession) and current.model is model:
            session = current
        else:
            session = cls(model, layers)
            session._route_in()
        session.users += 1
        return session

    def detach(self) -> None:
        """Drop one user; the last one restores the model exactly as it was."""
        self.users -= 1
        if self.users <= 0:
            self._route_out()

    def _route_in(self) -> None:
        register_attention(self.name, self, self.base)
        for config in self.configs:
            set_attention_implementation(config, self.name)
        self._hook = self.model.register_forward_pre_hook(self._pre_forward, with_kwargs=True)

    def _route_out(self) -> None:
        for config in self.configs:
            set_attention_implementation(config, self.base)
        unregister_attention(self.name)
        if self._hook is not None:
            self._hook.remove()
            self._hook = None

    def _pre_forward(self, module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        if args and "input_ids" not in kwargs and isinstance(args[0], torch.Tensor):
            kwargs = {**kwargs, "input_ids": args[0]}
        for ablation in self.ablations:
            ablation.on_forward(self, kwargs)
        for observer in self.observers:
            observer.on_forward(self, kwargs)

    def _kernel(self, module: nn.Module) -> Callable:
        if self.base == "eager":
            fn = eager_kernel(module)
            if fn is None:
                raise CaptureError(f"{type(module).__module__} has no eager_attention_forward")
            return fn
        return attention_function(self.base)

    def ablated(self, layer: int) -> tuple[list[int], list[int]]:
        """Heads of `layer` to zero and to make uniform, over all active ablations."""
        zero: set[int] = set()
        uniform: set[int] = set()
        for ablation in self.ablations:
            if ablation.mode in ("zero", "uniform"):
                heads = ablation.heads_by_layer.get(layer, ())
                (zero if ablation.mode == "zero" else uniform).update(heads)
        return sorted(zero), sorted(uniform - zero)

    def __call__(self, module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                 attention_mask: torch.Tensor | None, **kwargs: Any) -> tuple[torch.Tensor, Any]:
        kernel = self._kernel(module)
        layer = self.layer_of.get(id(module))
        if layer is None:
            return kernel(module, query, key, value, attention_mask, **kwargs)
        zero, uniform = self.ablated(layer)
        call = AttentionCall(layer, module, query, key, value, attention_mask, kwargs, uniform)
        split = None
        for ablation in self.ablations:
            call.key_masks.extend(ablation.key_masks(call))
            if split is None:
                split = ablation.cache_layer(call)
        if split is None:
            out, weights = apply_key_masks(call, self.base, kernel)
        else:
            out, weights = attend_pruned(call, split, self.base, kernel)
            if (self.observers or uniform) and split.length != query.shape[2]:
                call.key, call.value = split.dense()
        if zero or uniform:
            out = out.clone()
            if zero:
                out[:, :, zero] = 0
            if uniform:
                out, weights = _uniform_heads(call, out, weights)
        for ablation in self.ablations:
            ablation.after(call)
        for observer in self.observers:
            observer.observe(call)
        return out, weights


def _uniform_heads(call: AttentionCall, out: torch.Tensor, weights: Any) -> tuple[torch.Tensor, Any]:
    """Replace the output of `call.uniform_heads` by the mean of the values over the keys each row sees."""
    b, h, q_len, _ = call.query.shape
    rows = torch.arange(q_len, device=call.query.device).expand(b, -1)
    vis, _ = call.visible(rows)
    uniform = vis.float() / vis.sum(-1, keepdim=True).clamp(min=1)
    group = h // call.value.shape[1]
    kv_heads = [head // group for head in call.uniform_heads]
    v = call.value[:, kv_heads].float()
    mixed = torch.einsum("bqk,bnkd->bqnd", uniform, v)
    out[:, :, call.uniform_heads] = mixed.to(out.dtype)
    if isinstance(weights, torch.Tensor) and weights.dim() == 4:
        weights = weights.clone()
        weights[:, call.uniform_heads] = uniform[:, None].to(weights.dtype)
    return out, weights
