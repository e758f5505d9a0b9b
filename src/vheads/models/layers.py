"""Where a model's language-model layers are: the attention module of each decoder layer and the configs they read.

Model knowledge, not capture: the capture session routes these layers through its attention function, the run
records which of them have softmax attention, and selectors read the same from a config alone.
"""

from __future__ import annotations

from typing import Any

from torch import nn

NO_SOFTMAX = ("linear", "mamba", "conv", "recurrent", "ssm")


class LayerError(ValueError):
    """No language model with decoder layers, or a layer without an attention module, in a model."""


def language_layers(model: nn.Module) -> tuple[list[nn.Module | None], list[Any]]:
    """The attention module of every language-model layer, in order (None for a layer without softmax
    attention), and the configs they read.

    The language model is the decoder whose config is the model's text config; its vision tower (which
    goes through the same attention interface) is left out. Hybrid decoders (Qwen3.5) mix softmax-attention
    layers with token mixers that have no attention weights (Gated DeltaNet `linear_attn`: a `layer_idx`
    but no attention config); those layers are None and have no figures.
    """
    config = model.config
    text_config = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    decoders = [d for d in (_declared_decoder(model),) if d is not None and d.config is text_config]
    if not decoders:
        decoders = [m for m in model.modules() if getattr(m, "config", None) is text_config
                    and isinstance(getattr(m, "layers", None), nn.ModuleList)]
    if not decoders:
        decoders = [m for m in model.modules() if isinstance(getattr(m, "layers", None), nn.ModuleList)
                    and getattr(getattr(m, "config", None), "num_attention_heads", None) is not None
                    and "vision" not in type(m).__name__.lower()]
    if not decoders:
        raise LayerError(f"no language model with decoder layers found in {type(model).__name__}")
    attention: list[nn.Module | None] = []
    for layer in decoders[0].layers:
        found = next((m for m in layer.modules() if m is not layer and hasattr(m, "layer_idx")
                      and getattr(m, "config", None) is not None), None)
        if found is None and not any(m is not layer and hasattr(m, "layer_idx") for m in layer.modules()):
            raise LayerError(f"no attention module (with layer_idx) in layer {type(layer).__name__}")
        attention.append(found)
    configs = []
    for m in attention:
        if m is not None and all(m.config is not c for c in configs):
            configs.append(m.config)
    if not configs:
        raise LayerError(f"the language model of {type(model).__name__} has no softmax-attention layer")
    return attention, configs


def attention_layer_indices(model: nn.Module) -> list[int]:
    """Indices of the language-model layers with softmax attention (every layer except in hybrid decoders)."""
    return [i for i, m in enumerate(language_layers(model)[0]) if m is not None]


def config_attention_layers(text_config: Any) -> list[int]:
    """The layers with softmax attention by a text config alone: all of them, except those whose `layer_types`
    entry names a linear / recurrent mixer (Qwen3.5's `linear_attention`)."""
    n = int(text_config.num_hidden_layers)
    kinds = getattr(text_config, "layer_types", None) or ["attention"] * n
    return [i for i, kind in enumerate(list(kinds)[:n]) if not str(kind).startswith(NO_SOFTMAX)]


def _declared_decoder(model: nn.Module) -> nn.Module | None:
    """The text decoder the model names through `get_decoder()`, if it has decoder layers (saves a module walk)."""
    get = getattr(model, "get_decoder", None)
    try:
        decoder = get() if callable(get) else None
    except (AttributeError, NotImplementedError, TypeError):
        return None
    layers = getattr(decoder, "layers", None)
    return decoder if isinstance(layers, nn.ModuleList) and hasattr(decoder, "config") else None
