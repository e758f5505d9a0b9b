"""What a pruning run keeps of the image's keys and values: the record `runs.tags` holds for image-blind,
flow-blind and FastV runs, and the share of the image KV cache they need (the x axis of the efficiency frontier).

Pure functions of the run's settings and the model's grid; the capture side does the pruning itself.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from vheads.heads import Head, image_kv_heads, image_kv_share

# Head modes that take the image away from a head, so that its key/value head may drop the image from the cache.
PRUNING_MODES = ("image-blind", "flow-blind")


def fastv_kv_share(layer: int, keep: float, attention_layers: Sequence[int]) -> float:
    """The share of the image KV cache FastV holds, counted per attention layer as the cache holds it: layers
    before `layer` keep every image token, the others the `keep` share, so (K + (L - K) * R) / L over the L
    attention layers (K of them before `layer`)."""
    if not 0 < keep <= 1:
        raise ValueError(f"FastV keeps a share in (0, 1] of the image tokens, got {keep}")
    layers = sorted(int(i) for i in attention_layers)
    if not layers:
        return 1.0
    full = sum(1 for i in layers if i < layer)
    return (full + (len(layers) - full) * keep) / len(layers)


def image_kv_record(mode: str, blind: Sequence[Head], heads: int, kv_heads: int, attention_layers: Sequence[int],
                    fastv: tuple[int, float] | None = None) -> dict[str, Any]:
    """What runs.tags records for a pruning run: `image_kv_heads` (per attention layer, as "layer": [key/value
    heads that keep the image]) and `image_kv_share` (the share of the image's cache kept); with FastV instead
    `image_kv_share` alone (every key/value head keeps the R share of the image tokens after layer K). Empty for
    other runs."""
    if fastv is not None:
        return {"image_kv_share": fastv_kv_share(fastv[0], fastv[1], attention_layers)}
    if mode not in PRUNING_MODES:
        return {}
    kept = image_kv_heads(blind, heads, kv_heads, attention_layers)
    return {"image_kv_heads": {str(layer): kv for layer, kv in kept.items()},
            "image_kv_share": image_kv_share(kept, kv_heads)}


def run_image_kv(config: Any, model_config: Any, heads: int, attention_layers: Sequence[int]) -> dict[str, Any]:
    """`image_kv_record` of a run's config (`RunConfig`) on its model: the key/value heads per layer come from
    the language model's config (`num_key_value_heads`, else one per query head)."""
    text = model_config.get_text_config()
    kv_heads = int(getattr(text, "num_key_value_heads", None) or heads)
    fastv = (int(config.fastv_layer), float(config.fastv_keep)) if config.fastv_layer is not None else None
    return image_kv_record(config.ablation, config.ablate, heads, kv_heads, attention_layers, fastv)
