"""`ablate`: switch attention heads of the language model off, for forward and generate alike."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from torch import nn

from vheads.capture.session import CaptureSession
from vheads.heads import missing_heads

MODES = ("zero", "uniform")


class ablate:  # noqa: N801 - used as a context manager, like torch.no_grad
    """Context manager that ablates `heads` ((layer, head) pairs) of the language model.

    `zero`: the head's attention output is zero at every position and step (the same as zeroing its slice
    of `o_proj`'s input). `uniform`: the head attends uniformly over the keys it may see (causal, unpadded),
    so its output is the mean of the visible values. Composes with `HeadRecorder` in either order; a
    recorder reports the uniform distribution for uniform-ablated heads.
    """

    def __init__(self, model: nn.Module, heads: Iterable[tuple[int, int]], mode: str = "zero"):
        if mode not in MODES:
            raise ValueError(f"unknown ablation mode {mode!r}; expected one of {', '.join(MODES)}")
        self.model = model
        self.mode = mode
        self.heads = sorted({(int(layer), int(head)) for layer, head in heads})
        self.heads_by_layer: dict[int, list[int]] = {}
        for layer, head in self.heads:
            self.heads_by_layer.setdefault(layer, []).append(head)
        self.session: CaptureSession | None = None

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
        session, self.session = self.session, None
        if session is not None:
            session.ablations.remove(self)
            session.detach()
