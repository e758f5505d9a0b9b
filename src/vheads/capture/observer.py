"""`Observer`: the base of context managers that watch a model's attention through its capture session."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from vheads.capture.session import AttentionCall, CaptureSession
from vheads.compat import forward_cache


class Observer:
    """Attach to the model's `CaptureSession` on entry, leave it (restoring the model when last) on exit.

    Subclasses implement `on_forward` (called before every forward of the model, with its keyword
    arguments) and `observe` (called with every language-model attention call).
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


def is_prefill(kwargs: dict[str, Any]) -> bool:
    """Whether a forward call starts a sequence (no cache yet) rather than decoding from one."""
    past = forward_cache(kwargs)
    return past is None or past.get_seq_length() == 0


def prompt_layout(input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                  image_token_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Real (unpadded) positions, image positions, and each row's last real position (the prompt readout row)."""
    real = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
    image = (input_ids == image_token_id) & real
    positions = torch.arange(input_ids.shape[1], device=input_ids.device)
    last = torch.where(real, positions, -1).max(dim=1).values
    return real, image, last
