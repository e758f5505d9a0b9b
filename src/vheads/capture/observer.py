"""What observers share: telling prefill from decode, and the prompt's layout (real, image and readout positions).

The observer contract itself, `Observer`, lives beside the session that calls it (`capture.session`)."""

from __future__ import annotations

from typing import Any

import torch

from vheads.compat import forward_cache


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
