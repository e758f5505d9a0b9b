"""Tiny region-test models beyond the family builders of `tiny_models`: LLaVA with a Pixtral vision tower
(the Pixtral-12B layout: one `[IMG]` per patch, `[IMG_BREAK]` per row, `[IMG_END]`)."""

from __future__ import annotations

from pathlib import Path

import torch
from tiny_models import _finish, chat_template, small_text, word_tokenizer


def build_llava_pixtral(out: Path) -> Path:
    """LLaVA with a Pixtral tower: images up to 48px in 8px patches, no merging, `[IMG]` per patch."""
    from transformers import LlavaConfig, LlavaForConditionalGeneration, PixtralImageProcessorPil

    from vheads.models.processors import PixtralProcessor

    torch.manual_seed(0)
    tok = word_tokenizer(("[IMG]", "[IMG_BREAK]", "[IMG_END]"))
    ip = PixtralImageProcessorPil(size={"longest_edge": 48}, patch_size=8)
    proc = PixtralProcessor(image_processor=ip, tokenizer=tok, patch_size=8, spatial_merge_size=1,
                            chat_template=chat_template("[IMG]"))
    vision = dict(model_type="pixtral", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=2, head_dim=16, image_size=48, patch_size=8)
    text = {**small_text(tok), "model_type": "mistral", "sliding_window": None}
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_id=tok.convert_tokens_to_ids("[IMG]"),
                         vision_feature_layer=-1, vision_feature_select_strategy="full", projector_hidden_act="gelu")
    return _finish(LlavaForConditionalGeneration(config), proc, tok, out)


REGION_BUILDERS = {"llava_pixtral": build_llava_pixtral}
