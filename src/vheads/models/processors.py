"""Processors without torchvision: a family's own processor class with its video part left out.

transformers' multimodal processors (Qwen2-VL, InternVL, SmolVLM, ...) also hold a video processor, and every
video processor needs torchvision; Pixtral's processor (Mistral 3) is torchvision-only as a whole. vheads only
feeds images, so where torchvision is missing it builds the family's processor class over its image processor
(the PIL backend, which `AutoImageProcessor` picks by itself) and its tokenizer, and nothing else.
"""

from __future__ import annotations

import json
from functools import cache

import numpy as np
from transformers import AutoConfig, ProcessorMixin

from vheads.compat import PROCESSOR_MAPPING_NAMES, is_torchvision_available, optional_file, processor_class_from_name

CONFIG_FILES = ("processor_config.json", "preprocessor_config.json", "tokenizer_config.json")


class ProcessorError(ValueError):
    """No processor can be built for a model on this machine."""


def needs_torchvision_free_route() -> bool:
    """Whether this machine lacks torchvision, so processors must be built without their video part."""
    return not is_torchvision_available()


def processor_class_name(ref: str, **hub: object) -> str | None:
    """The processor class a model folder or hub id names (processor / preprocessor / tokenizer config), else the
    class transformers maps its `model_type` to."""
    for name in CONFIG_FILES:
        path = optional_file(ref, name, **hub)
        if path is None:
            continue
        with open(path, encoding="utf-8") as handle:
            value = json.load(handle).get("processor_class")
        if value:
            return str(value)
    model_type = getattr(AutoConfig.from_pretrained(ref, **hub), "model_type", "")
    return PROCESSOR_MAPPING_NAMES.get(model_type)


@cache
def image_only(cls: type[ProcessorMixin]) -> type[ProcessorMixin]:
    """A subclass of processor class `cls` whose sub-processors leave out the video processor (same class name, so
    a folder it saves names `cls` as a hub folder does). Pass `video_processor=None` where `cls` requires it."""
    attributes = [a for a in cls.get_attributes() if "video" not in a]
    left_out = [a for a in cls.get_attributes() if "video" in a]
    if not left_out:
        return cls

    def apply_chat_template(self, conversation, chat_template=None, **kwargs):
        """The chat template rendered as `ProcessorMixin` renders it (family overrides only add video defaults)."""
        return ProcessorMixin.apply_chat_template(self, conversation, chat_template, **kwargs)

    body = {"left_out": tuple(left_out), "apply_chat_template": apply_chat_template,
            "get_attributes": classmethod(lambda _: list(attributes)), "__module__": __name__,
            "__doc__": f"{cls.__name__} with its image processor and tokenizer only (no video processor)."}
    return type(cls.__name__, (cls,), body)


class PixtralProcessor(ProcessorMixin):
    """Pixtral's processor (Mistral 3) without torchvision: the same token layout as transformers' PixtralProcessor.

    Each image becomes rows of `[IMG]` tokens, one per (patch_size x spatial_merge_size) cell of the resized
    image, each row closed by `[IMG_BREAK]` and the last one by `[IMG_END]` instead.
    """

    def __init__(self, image_processor=None, tokenizer=None, patch_size: int = 16, spatial_merge_size: int = 1,
                 chat_template=None, image_token: str = "[IMG]", image_break_token: str = "[IMG_BREAK]",
                 image_end_token: str = "[IMG_END]", **kwargs):
        super().__init__(image_processor, tokenizer, chat_template=chat_template)
        self.patch_size = patch_size
        self.spatial_merge_size = spatial_merge_size
        self.image_token = image_token
        self.image_break_token = image_break_token
        self.image_end_token = image_end_token
        self.image_token_id = tokenizer.convert_tokens_to_ids(image_token)
        self.image_break_token_id = tokenizer.convert_tokens_to_ids(image_break_token)
        self.image_end_token_id = tokenizer.convert_tokens_to_ids(image_end_token)

    @property
    def image_token_ids(self) -> list[int]:
        """The ids of the image, row-break and end-of-image tokens."""
        return [self.image_token_id, self.image_break_token_id, self.image_end_token_id]

    def _process_images(self, images, **images_kwargs):
        images_kwargs["patch_size"] = self.patch_size * self.spatial_merge_size
        return super()._process_images(images, **images_kwargs)

    def replace_image_token(self, image_inputs: dict, image_idx: int, **kwargs) -> str:
        """The text one image placeholder expands to: `[IMG]`*w + `[IMG_BREAK]` per row, the last break `[IMG_END]`."""
        cell = self.patch_size * self.spatial_merge_size
        height, width = (int(v) for v in np.asarray(image_inputs["image_sizes"][image_idx]).tolist())
        tokens = ([self.image_token] * (width // cell) + [self.image_break_token]) * (height // cell)
        tokens[-1] = self.image_end_token
        return "".join(tokens)

    @property
    def model_input_names(self) -> list[str]:
        """Tokenizer inputs, image inputs and the image sizes the model reads."""
        return self.tokenizer.model_input_names + self.image_processor.model_input_names + ["image_sizes"]


OWN = {"PixtralProcessor": PixtralProcessor}


def load_processor(ref: str, family: str, **hub: object) -> ProcessorMixin:
    """The processor of `ref` built without torchvision (image processor and tokenizer only)."""
    name = processor_class_name(ref, **hub)
    if name is None:
        raise ProcessorError(f"no processor class named in {ref} and none known for model type {family}")
    if name in OWN:
        return OWN[name].from_pretrained(ref, **hub)
    cls = processor_class_from_name(name)
    if cls is None or not isinstance(cls, type) or not issubclass(cls, ProcessorMixin):
        raise ProcessorError(f"transformers has no processor class {name} usable without torchvision ({family})")
    images_only = image_only(cls)
    return images_only.from_pretrained(ref, **dict.fromkeys(getattr(images_only, "left_out", ())), **hub)
