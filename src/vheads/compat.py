"""Every place vheads leans on transformers beyond its documented model API, in one module.

transformers ships every two weeks and renames what vheads uses (5.24 renamed the forward's
`past_key_values` to `cache`). Each item below says what it reaches into and which releases need it;
where releases differ, the item detects the difference by what a call carries or what a module holds,
never by version numbers. The tested range is pyproject's `transformers` requirement; CI runs the
parity tests on its floor and on the newest release it allows (see the README's install section).
"""

from __future__ import annotations

import inspect
import sys
from collections.abc import Callable
from typing import Any

from torch import nn
from transformers import AttentionInterface, DynamicCache
from transformers.cache_utils import DynamicLayer
from transformers.image_processing_utils import select_best_resolution
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.auto.processing_auto import PROCESSOR_MAPPING_NAMES, processor_class_from_name
from transformers.utils import cached_file, is_torchvision_available

__all__ = [
    "PROCESSOR_MAPPING_NAMES", "DynamicCache", "DynamicLayer", "attention_function", "attention_implementation",
    "eager_kernel", "forward_cache", "generate_cache_keyword", "is_torchvision_available", "optional_file",
    "processor_class_from_name", "register_attention", "registered_attention", "select_best_resolution",
    "set_attention_implementation", "unregister_attention",
]

CACHE_ARGUMENTS = ("cache", "past_key_values")
"""The names under which a model's forward receives its KV cache: `cache` from 5.24 on (what `generate` passes
there), `past_key_values` up to 5.23 and, from 5.24 until 5.40, as a deprecated alias a caller may still use."""


def forward_cache(kwargs: dict[str, Any]) -> Any:
    """The KV cache a forward call carries, under either of its names (`CACHE_ARGUMENTS`), or None.

    Read by a forward pre-hook, so it sees the caller's keywords before transformers' `deprecate_kwarg` renames
    them: both names occur on 5.24+ (`generate` passes `cache`, older user code `past_key_values`)."""
    for name in CACHE_ARGUMENTS:
        value = kwargs.get(name)
        if value is not None:
            return value
    return None


def generate_cache_keyword(model: nn.Module) -> str:
    """The keyword under which `model.generate` takes a ready KV cache: `cache` from 5.24 on, `past_key_values` up
    to 5.23 (5.24+ still take it, deprecated). Told by the model's forward, which names its cache argument the same
    way (`DynamicLayer`, the per-layer class of `DynamicCache`, lives in `transformers.cache_utils` in 5.0 - 5.25)."""
    parameters = inspect.signature(model.forward).parameters
    return "cache" if "cache" in parameters else "past_key_values"


def optional_file(ref: str, name: str, **hub: Any) -> str | None:
    """The local path of file `name` of a model folder or hub id, or None where it has none (or is unreachable).

    `cached_file`'s `_raise_exceptions_for_*` keywords are private (5.0 - 5.25) but the only way to ask for a
    file that may be missing without catching every error of the hub client."""
    return cached_file(ref, name, _raise_exceptions_for_missing_entries=False,
                       _raise_exceptions_for_connection_errors=False, **hub)


def register_attention(name: str, function: Callable, base: str) -> None:
    """Register `function` as attention implementation `name`, with the mask function of implementation `base`.

    `AttentionInterface.register` is public (5.0+); the mask function must be registered under the same name or
    padded batches lose their masks (`AttentionMaskInterface`, 4.53+; eager, sdpa and the flash kernels have one
    in every 5.x release)."""
    AttentionInterface.register(name, function)
    mask = registered_mask(base)
    if mask is not None:
        AttentionMaskInterface.register(name, mask)


def registered_mask(name: str) -> Callable | None:
    """The mask function registered as `name`, or None (reads the class-wide mapping: 5.0 - 5.25)."""
    return ALL_MASK_ATTENTION_FUNCTIONS._global_mapping.get(name)


def registered_attention(name: str) -> Callable | None:
    """The attention function registered as `name` class-wide, or None.

    transformers has no public lookup that returns None for an unknown name; `GeneralInterface._global_mapping`
    is the class-wide registry in every 5.x release so far (5.0 - 5.25)."""
    return ALL_ATTENTION_FUNCTIONS._global_mapping.get(name)


def unregister_attention(name: str) -> None:
    """Remove attention and mask function `name` (no public unregister in 5.0 - 5.25: the class-wide mappings)."""
    ALL_ATTENTION_FUNCTIONS._global_mapping.pop(name, None)
    ALL_MASK_ATTENTION_FUNCTIONS._global_mapping.pop(name, None)


def attention_function(name: str) -> Callable:
    """The attention function of a built-in implementation (`sdpa`, `flash_attention_2`, ...)."""
    return ALL_ATTENTION_FUNCTIONS[name]


def attention_implementation(config: Any) -> str:
    """The attention implementation a (text) config routes its layers through; `eager` when unset.

    Modeling files read the private `config._attn_implementation` at every call (5.0 - 5.25); switching it is
    what routes layers through a registered function without reloading the model."""
    return getattr(config, "_attn_implementation", None) or "eager"


def set_attention_implementation(config: Any, name: str) -> None:
    """Route the layers that read `config` through implementation `name` (see `attention_implementation`).

    `PreTrainedModel.set_attn_implementation` (5.0+) checks the name against installed kernels and walks every
    sub-config, the vision tower's too; vheads needs the language model's configs alone."""
    config._attn_implementation = name


def eager_kernel(module: nn.Module) -> Callable | None:
    """The `eager_attention_forward` of the modeling file that defines `module`, or None.

    Every modeling file of 5.x defines its own module-level eager function (Gemma's adds soft-capping, GPT-OSS's
    sinks); `ALL_ATTENTION_FUNCTIONS` has no `eager` entry, so it is found beside the module's class."""
    return getattr(sys.modules[type(module).__module__], "eager_attention_forward", None)
