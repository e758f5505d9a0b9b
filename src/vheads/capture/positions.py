"""`ImagePositions`: where the image tokens sit among the keys and query rows of each attention call, from a
prefill's `input_ids` to the last decode step (generated tokens are text)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from vheads.capture.observer import is_prefill, prompt_layout
from vheads.capture.session import CaptureError
from vheads.models.families import image_token_id as family_image_token_id


def resolve_image_token_id(model: nn.Module, image_token_id: int | None, owner: str) -> int:
    """`image_token_id` when given, else the model config's; a `ValueError` naming `owner` when neither exists
    (a bare language model such as a `LlamaModel` has none: pass `image_token_id=`)."""
    if image_token_id is not None:
        return int(image_token_id)
    token = family_image_token_id(model.config)
    if token is None:
        raise ValueError(f"{owner}: {type(model).__name__} has no image token id in its config; "
                         f"pass image_token_id=")
    return int(token)


class ImagePositions:
    """The image tokens of the sequences a model is running, kept from prefill through decode.

    `on_forward` reads each forward's keyword arguments: a prefill sets the image mask (`input_ids ==
    image_token_id` on real, unpadded positions), a decode step extends the sequence by its text tokens. An
    attention call's keys are the last `kv_len` positions of the sequence so far (sliding-window caches keep
    fewer than all), its query rows the last `q_len`.
    """

    def __init__(self, image_token_id: int):
        self.image_token_id = image_token_id
        self.image: torch.Tensor | None = None  # [batch, prompt] bool
        self.last: torch.Tensor | None = None  # [batch] each row's last real prompt position
        self.total = 0
        self.prefill = False

    def on_forward(self, kwargs: dict[str, Any]) -> None:
        """Start a sequence on prefill, add the step's tokens on decode."""
        input_ids = kwargs.get("input_ids")
        if is_prefill(kwargs):
            if input_ids is None:
                raise CaptureError("image-key ablations need input_ids to find the image tokens (got inputs_embeds)")
            _, self.image, self.last = prompt_layout(input_ids, kwargs.get("attention_mask"), self.image_token_id)
            self.total = input_ids.shape[1]
            self.prefill = True
            return
        self.total += input_ids.shape[1] if input_ids is not None else 1
        self.prefill = False

    def _span(self, length: int, device: torch.device) -> torch.Tensor:
        """Image flags [batch, length] of the sequence's last `length` positions (generated ones are text)."""
        if self.image is None:
            raise CaptureError("no prefill seen: image positions are read from the forward's input_ids")
        image = self.image.to(device)
        grown = self.total - image.shape[1]
        if grown > 0:
            image = torch.nn.functional.pad(image, (0, grown))
        return image[:, self.total - length: self.total]

    def keys(self, kv_len: int, device: torch.device) -> torch.Tensor:
        """Which of an attention call's `kv_len` keys are image tokens: bool [batch, kv_len]."""
        return self._span(kv_len, device)

    def rows(self, q_len: int, device: torch.device) -> torch.Tensor:
        """Which of an attention call's `q_len` query rows are image tokens: bool [batch, q_len]."""
        return self._span(q_len, device)
