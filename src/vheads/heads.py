"""A head of the language model, `(layer, head)`, and its `L.H` notation: parse, format, check against a grid.

One place for the spelling every command takes (`--ablate 3.1,4.7`, `--heads`) and every table, caption and
error message prints.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

Head = tuple[int, int]


def format_head(head: Head) -> str:
    """(3, 1) -> '3.1'."""
    return f"{head[0]}.{head[1]}"


def format_heads(heads: Iterable[Head], sep: str = ",") -> str:
    """[(3, 1), (4, 7)] -> '3.1,4.7', in the order given."""
    return sep.join(format_head(head) for head in heads)


def parse_heads(text: str | None, option: str = "--ablate") -> list[Head]:
    """'3.1,4.7' -> [(3, 1), (4, 7)]; ValueError naming the option and the bad item."""
    heads = []
    for item in (text or "").replace(" ", "").split(","):
        if not item:
            continue
        parts = item.split(".")
        if len(parts) != 2 or not all(p.isdigit() for p in parts):
            raise ValueError(f"{option}: {item!r} is not LAYER.HEAD (e.g. 3.1)")
        heads.append((int(parts[0]), int(parts[1])))
    return heads


def missing_heads(heads: Iterable[Head], layers: int, per_layer: int) -> list[str]:
    """The `L.H` labels of the heads a grid of `layers` x `per_layer` heads does not have."""
    return [format_head((layer, head)) for layer, head in heads if not (0 <= layer < layers and 0 <= head < per_layer)]


def check_heads(heads: Sequence[Head], layers: int, per_layer: int, attention_layers: Sequence[int] | None = None,
                option: str = "--ablate") -> None:
    """ValueError naming the heads the grid lacks, or that sit in a layer without softmax attention."""
    bad = missing_heads(heads, layers, per_layer)
    if bad:
        raise ValueError(f"{option}: heads {', '.join(bad)} do not exist ({layers} layers x {per_layer} heads)")
    linear = [format_head(h) for h in heads if attention_layers is not None and h[0] not in attention_layers]
    if linear:
        raise ValueError(f"{option}: heads {', '.join(linear)} are in layers without softmax attention "
                         f"(attention layers: {', '.join(map(str, attention_layers))})")


def image_kv_heads(blind: Iterable[Head], heads: int, kv_heads: int,
                   attention_layers: Iterable[int]) -> dict[int, list[int]]:
    """Per attention layer, the key/value heads that keep the image's keys and values when `blind` query heads are
    image-blind: with grouped-query attention query head h reads key/value head h // (heads // kv_heads), and a
    key/value head can drop the image only when every query head it serves is blind."""
    if kv_heads < 1 or heads % kv_heads:
        raise ValueError(f"{heads} query heads do not split into {kv_heads} key/value groups")
    group = heads // kv_heads
    blind_set = {(int(layer), int(head)) for layer, head in blind}
    return {layer: [kv for kv in range(kv_heads)
                    if not all((layer, kv * group + g) in blind_set for g in range(group))]
            for layer in sorted(attention_layers)}


def image_kv_share(kept: dict[int, list[int]], kv_heads: int) -> float:
    """The share of the image's key/value cache that `image_kv_heads`' kept heads hold (1.0: nothing dropped)."""
    if not kept:
        return 1.0
    return sum(len(heads) for heads in kept.values()) / (kv_heads * len(kept))
