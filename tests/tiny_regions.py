"""Tiny region-test models beyond the family builders of `tiny_models`: LLaVA with a Pixtral vision tower
(the Pixtral-12B layout: one `[IMG]` per patch, `[IMG_BREAK]` per row, `[IMG_END]`)."""

from __future__ import annotations

from pathlib import Path

import torch
from tiny_models import _finish, pixtral_parts


def build_llava_pixtral(out: Path) -> Path:
    """LLaVA with a Pixtral tower: images up to 48px in 8px patches, no merging, `[IMG]` per patch."""
    from transformers import LlavaConfig, LlavaForConditionalGeneration

    torch.manual_seed(0)
    tok, proc, vision, text = pixtral_parts(48, merge=1)
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_id=tok.convert_tokens_to_ids("[IMG]"),
                         vision_feature_layer=-1, vision_feature_select_strategy="full", projector_hidden_act="gelu")
    return _finish(LlavaForConditionalGeneration(config), proc, tok, out)


REGION_BUILDERS = {"llava_pixtral": build_llava_pixtral}
