"""Family adapters: how to prompt a model, batch its inputs, and map its image tokens back to patches."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
from PIL import Image
from transformers import BatchFeature

from vheads.models.geometry import (
    GeometryError,
    TokenGrid,
    clip_grid,
    merged_grid,
    pixtral_grid,
    pooled_grid,
    processor_key,
    size_value,
    squashed_grid,
)
from vheads.models.tiles import idefics3_grid, internvl_grid, llava_next_grid, padded_square_grid

Box = tuple[float, float, float, float]


class ModelError(ValueError):
    """A model that cannot be loaded or used by vheads (bad path, no image token, no processor, ...)."""


def image_token_id(config: object) -> int | None:
    """The id of the image placeholder token in a model config (`image_token_id` or the older `image_token_index`)."""
    for name in ("image_token_id", "image_token_index"):
        value = getattr(config, name, None)
        if value is not None:
            return int(value)
    return None


class Adapter:
    """The generic adapter for any image-text-to-text model with an image token.

    It prompts through the processor's chat template, batches with left padding and, where the processor
    reports a patch grid (`image_grid_thw`, Qwen2-VL style), maps tokens to patches.
    """

    family = "generic"

    def __init__(self, model: torch.nn.Module, processor: object):
        self.model = model
        self.processor = processor
        token = image_token_id(model.config)
        if token is None:
            raise ModelError(f"{type(model).__name__} has no image token id in its config: vheads needs a model "
                             "whose processor expands an image placeholder into image tokens")
        self.image_token_id = token
        tokenizer = getattr(processor, "tokenizer", None)
        if tokenizer is None:
            raise ModelError(f"the processor {type(processor).__name__} has no tokenizer")
        tokenizer.padding_side = "left"
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        self.tokenizer = tokenizer
        self._grids: dict[tuple, TokenGrid] = {}

    def cached_grid(self, key: tuple, build: Callable[[], TokenGrid]) -> TokenGrid:
        """The token grid of an image geometry `key` (sizes and settings), built once per adapter: a dataset
        has few distinct image sizes and every batch asks again."""
        grid = self._grids.get(key)
        if grid is None:
            if len(self._grids) >= 4096:
                self._grids.clear()
            grid = self._grids[key] = build()
        return grid

    @property
    def image_placeholder(self) -> str:
        """The text the processor expands into image tokens."""
        return getattr(self.processor, "image_token", None) or "<image>"

    def prompt(self, text: str, n_images: int = 1) -> str:
        """The full prompt for a question about `n_images` images, through the chat template when there is one."""
        if getattr(self.processor, "chat_template", None):
            content = [{"type": "image"} for _ in range(n_images)] + [{"type": "text", "text": text}]
            messages = [{"role": "user", "content": content}]
            return self.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return "\n".join([self.image_placeholder] * n_images + [text])

    def encode(self, prompts: Sequence[str], images: Sequence[Sequence[Image.Image]]) -> BatchFeature:
        """Processor inputs for a batch: left-padded text, each prompt with its list of images."""
        nested = [list(row) for row in images]
        return self.processor(images=nested, text=list(prompts), return_tensors="pt", padding=True)

    def decode(self, output_ids: torch.Tensor, prompt_len: int) -> list[str]:
        """The generated answers of a batch, special tokens removed, stripped."""
        texts = self.tokenizer.batch_decode(output_ids[:, prompt_len:], skip_special_tokens=True)
        return [t.strip() for t in texts]

    def image_grids(self, images: Sequence[Image.Image], inputs: BatchFeature, first: int) -> list[TokenGrid]:
        """The token geometry of each image of one row (`first` = index of its first image in the batch)."""
        thw = inputs.get("image_grid_thw")
        if thw is None:
            raise GeometryError(f"vheads does not know how {type(self.model).__name__} lays out image tokens")
        merge = int(getattr(getattr(self.processor, "image_processor", None), "merge_size", 2))
        patch = int(getattr(getattr(self.processor, "image_processor", None), "patch_size", 14))
        return [merged_grid(img.width, img.height, tuple(thw[first + i].tolist()), patch, merge)
                for i, img in enumerate(images)]

    def image_settings(self) -> dict:
        """The image processor's settings as the processor passes them on a call: its own attributes overridden
        by the processor's defaults (InternVL turns `crop_to_patches` on this way)."""
        ip = self.processor.image_processor
        merged: dict = {}
        merge = getattr(self.processor, "_merge_kwargs", None)
        if merge is not None:
            try:
                merged = merge(tokenizer_init_kwargs=self.tokenizer.init_kwargs)["images_kwargs"]
            except (TypeError, KeyError, AttributeError, ValueError):
                merged = {}
        names = ("size", "do_resize", "crop_to_patches", "min_patches", "max_patches", "max_image_size",
                 "do_image_splitting", "do_pan_and_scan")
        settings = {name: getattr(ip, name, None) for name in names}
        settings.update({k: v for k, v in merged.items() if v is not None})
        return settings

    def row_grids(self, images: Sequence[Sequence[Image.Image]], inputs: BatchFeature) -> list[list[TokenGrid]]:
        """Per batch row, the `TokenGrid` of each of its images, checked against the row's image tokens."""
        grids = []
        first = 0
        counts = (inputs["input_ids"] == self.image_token_id).sum(dim=1).tolist()
        for row, row_images in enumerate(images):
            per_image = self.image_grids(row_images, inputs, first)
            first += len(row_images)
            n = counts[row]
            total = sum(len(g) for g in per_image)
            if total != n:
                raise GeometryError(f"row {row} has {n} image tokens but the {self.family} geometry gives "
                                    f"{total}; the processor and the model disagree")
            grids.append(per_image)
        return grids

    def token_grids(self, images: Sequence[Sequence[Image.Image]], inputs: BatchFeature) -> list[TokenGrid]:
        """One `TokenGrid` per batch row covering all its image tokens in order."""
        return [TokenGrid.concat(per_image) for per_image in self.row_grids(images, inputs)]

    def region_mask(self, images: Sequence[Sequence[Image.Image]], inputs: BatchFeature,
                    boxes: Sequence[Box | None]) -> torch.Tensor | None:
        """Bool [batch, seq]: the tokens of each row's first image whose patch overlaps the row's box, or None."""
        if all(box is None for box in boxes):
            return None
        return self.boxes_mask(self.row_grids(images, inputs), inputs, [[] if b is None else [b] for b in boxes])

    def boxes_mask(self, grids: Sequence[Sequence[TokenGrid]], inputs: BatchFeature,
                   boxes: Sequence[Sequence[Box]]) -> torch.Tensor:
        """Bool [batch, seq]: the tokens of each row's first image whose patch overlaps any of the row's boxes.

        `grids` are `row_grids` of the batch; a row with no box has no token marked.
        """
        image = inputs["input_ids"] == self.image_token_id
        hits = np.zeros((len(grids), max(1, int(image.sum(dim=1).max()))), dtype=bool)
        for row, (per_image, row_boxes) in enumerate(zip(grids, boxes, strict=True)):
            for box in row_boxes:
                hits[row, : len(per_image[0])] |= per_image[0].overlaps(box)
        nth_image_token = (image.cumsum(dim=1) - 1).clamp(min=0)
        return image & torch.from_numpy(hits).gather(1, nth_image_token)


class LlavaAdapter(Adapter):
    """LLaVA-1.5 and its Llama-3 / Phi-3 variants: one CLIP grid per image."""

    family = "llava"

    def _cls(self) -> bool:
        return getattr(self.model.config, "vision_feature_select_strategy", "default") == "full"

    def image_grids(self, images: Sequence[Image.Image], inputs: BatchFeature, first: int) -> list[TokenGrid]:
        ip = self.processor.image_processor
        patch, cls = int(self.model.config.vision_config.patch_size), self._cls()
        key = (patch, cls, processor_key(ip))
        return [self.cached_grid((img.width, img.height, *key),
                                 lambda img=img: clip_grid(img.width, img.height, ip, patch, cls)) for img in images]


class VipLlavaAdapter(LlavaAdapter):
    """ViP-LLaVA: LLaVA-1.5 geometry; its features always drop the CLS token."""

    family = "vipllava"

    def _cls(self) -> bool:
        return False


class LlavaNextAdapter(Adapter):
    """LLaVA-1.6 / NeXT: the base grid plus the anyres tiles with their newline tokens."""

    family = "llava_next"

    def image_grids(self, images: Sequence[Image.Image], inputs: BatchFeature, first: int) -> list[TokenGrid]:
        config = self.model.config
        vision = config.vision_config
        cls = getattr(config, "vision_feature_select_strategy", "default") == "full"
        return [self.cached_grid(
            (img.width, img.height, cls, processor_key(self.processor.image_processor)),
            lambda img=img: llava_next_grid(img.width, img.height, self.processor.image_processor,
                                            config.image_grid_pinpoints, int(vision.image_size),
                                            int(vision.patch_size), cls, newline=True),
        ) for img in images]


class LlavaOnevisionAdapter(Adapter):
    """LLaVA-OneVision: anyres like LLaVA-NeXT with the tiles' grid downsampled to `anyres_max_N` tiles' worth;
    with several images in a prompt, each is one padded-square grid plus a newline token."""

    family = "llava_onevision"

    def image_grids(self, images: Sequence[Image.Image], inputs: BatchFeature, first: int) -> list[TokenGrid]:
        config = self.model.config
        vision = config.vision_config
        if getattr(config, "vision_feature_select_strategy", "full") != "full":
            raise GeometryError("vheads maps LLaVA-OneVision tokens only with vision_feature_select_strategy "
                                "'full' (the 'default' strategy drops one patch of every tile)")
        ip = self.processor.image_processor
        tile, patch = int(vision.image_size), int(vision.patch_size)
        if len(images) > 1:
            return [padded_square_grid(img.width, img.height, tile, patch, newline=True) for img in images]
        max_tiles = int(str(getattr(config, "vision_aspect_ratio", "anyres_max_9")).removeprefix("anyres_max_"))
        return [self.cached_grid(
            (img.width, img.height, max_tiles, processor_key(ip)),
            lambda img=img: llava_next_grid(img.width, img.height, ip, config.image_grid_pinpoints, tile, patch,
                                            cls_token=False, newline=True, max_tiles=max_tiles),
        ) for img in images]


class InternVLAdapter(Adapter):
    """InternVL: tiles on the best aspect grid plus a thumbnail, each tile `image_seq_length` tokens."""

    family = "internvl"

    def image_grids(self, images: Sequence[Image.Image], inputs: BatchFeature, first: int) -> list[TokenGrid]:
        s = self.image_settings()
        size = s.get("size")
        tile_h, tile_w = size_value(size, "height"), size_value(size, "width")
        tokens = int(self.processor.image_seq_length)
        crop, lo, hi = bool(s.get("crop_to_patches")), int(s.get("min_patches") or 1), int(s.get("max_patches") or 1)
        return [self.cached_grid((img.width, img.height, tile_h, tile_w, tokens, crop, lo, hi),
                                 lambda img=img: internvl_grid(img.width, img.height, tile_h, tile_w, tokens, crop,
                                                               lo, hi)) for img in images]


class Idefics3Adapter(Adapter):
    """Idefics3 / SmolVLM: row-major crops, then the global image, each crop `image_seq_len` tokens."""

    family = "idefics3"

    def image_grids(self, images: Sequence[Image.Image], inputs: BatchFeature, first: int) -> list[TokenGrid]:
        s = self.image_settings()
        crop = size_value(s.get("max_image_size"), "longest_edge")
        if not crop:
            raise GeometryError(f"the {self.family} image processor has no max_image_size longest_edge")
        tokens, size, resize, split = (int(self.processor.image_seq_len), s.get("size"), bool(s.get("do_resize")),
                                       bool(s.get("do_image_splitting")))
        return [self.cached_grid((img.width, img.height, str(size), resize, crop, split, tokens),
                                 lambda img=img: idefics3_grid(img.width, img.height, size, resize, crop, split,
                                                               tokens)) for img in images]


class SmolVLMAdapter(Idefics3Adapter):
    """SmolVLM: the Idefics3 layout."""

    family = "smolvlm"


class PaliGemmaAdapter(Adapter):
    """PaliGemma: the image squashed to the SigLIP size, one grid of patches."""

    family = "paligemma"

    def image_grids(self, images: Sequence[Image.Image], inputs: BatchFeature, first: int) -> list[TokenGrid]:
        size = self.image_settings().get("size")
        frame_h, frame_w = size_value(size, "height"), size_value(size, "width")
        patch = int(self.model.config.vision_config.patch_size)
        return [squashed_grid(img.width, img.height, frame_h // patch, frame_w // patch, frame_h, frame_w)
                for img in images]


class PixtralAdapter(Adapter):
    """Pixtral vision (Mistral 3, Pixtral-LLaVA): the image resized to `image_sizes`, one [IMG] token per
    merged cell; the [IMG_BREAK] / [IMG_END] tokens after each row are not image tokens."""

    family = "pixtral"

    def image_grids(self, images: Sequence[Image.Image], inputs: BatchFeature, first: int) -> list[TokenGrid]:
        sizes = inputs.get("image_sizes")
        if sizes is None:
            raise GeometryError("the processor returned no image_sizes for a Pixtral-style model")
        cell = int(self.processor.patch_size) * int(getattr(self.processor, "spatial_merge_size", 1) or 1)
        grids = []
        for i, img in enumerate(images):
            h, w = (int(v) for v in sizes[first + i].tolist())
            grids.append(pixtral_grid(img.width, img.height, h, w, cell))
        return grids


class Mistral3Adapter(PixtralAdapter):
    """Mistral 3: the Pixtral layout with 2 x 2 patches merged per token."""

    family = "mistral3"


class Gemma3Adapter(Adapter):
    """Gemma 3: the image squashed to the vision size and pooled to `mm_tokens_per_image` tokens (no pan-and-scan)."""

    family = "gemma3"

    def image_grids(self, images: Sequence[Image.Image], inputs: BatchFeature, first: int) -> list[TokenGrid]:
        s = self.image_settings()
        if s.get("do_pan_and_scan"):
            raise GeometryError("vheads cannot map Gemma 3 pan-and-scan crops to patches; turn pan-and-scan off")
        tokens = int(self.model.config.mm_tokens_per_image)
        size = s.get("size")
        frame_h, frame_w = size_value(size, "height"), size_value(size, "width")
        return [pooled_grid(img.width, img.height, tokens, frame_h, frame_w) for img in images]


FAMILIES: dict[str, type[Adapter]] = {
    "gemma3": Gemma3Adapter,
    "idefics3": Idefics3Adapter,
    "internvl": InternVLAdapter,
    "llava": LlavaAdapter,
    "llava_next": LlavaNextAdapter,
    "llava_onevision": LlavaOnevisionAdapter,
    "mistral3": Mistral3Adapter,
    "paligemma": PaliGemmaAdapter,
    "smolvlm": SmolVLMAdapter,
    "vipllava": VipLlavaAdapter,
}


def adapter_for(model: torch.nn.Module, processor: object) -> Adapter:
    """The adapter of a model's family (by `config.model_type`; LLaVA with a Pixtral tower is Pixtral), the
    generic one otherwise."""
    config = model.config
    family = getattr(config, "model_type", "")
    if family == "llava" and getattr(getattr(config, "vision_config", None), "model_type", "") == "pixtral":
        return PixtralAdapter(model, processor)
    return FAMILIES.get(family, Adapter)(model, processor)


def boxes_to_array(boxes: Sequence[Box | None]) -> np.ndarray:
    """Boxes as a float array [n, 4] with NaN rows for missing boxes."""
    return np.array([b if b is not None else (np.nan,) * 4 for b in boxes], dtype=np.float64).reshape(-1, 4)
