"""Pruning curves: keep-only points (only the chosen heads see the image, every other head is image-blind or
flow-blind) and FastV points (after layer K only the R share of image tokens stays), planned on a head ranking.

Their runs are ordinary curve points (`analysis.ablation.curve`); the image KV each keeps is recorded by the run
itself (`pipeline.pruning`), the x axis of the efficiency frontier in the report.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import numpy as np
import pandas as pd

from vheads.analysis.points import BASELINE, Point
from vheads.analysis.selectors import CURVE_SELECTORS, canonical, is_selector, select_heads
from vheads.heads import Head
from vheads.pipeline.pruning import PRUNING_MODES

FASTV = "fastv"


def check_pruning(mode: str, keep: bool, fastv: Sequence[tuple[int, float]]) -> None:
    """ValueError unless keep-only selection goes with a pruning mode and FastV points with mode `fastv`."""
    if keep and mode not in PRUNING_MODES:
        raise ValueError(f"--keep makes every other head image-blind: use it with --mode {' or '.join(PRUNING_MODES)}"
                         f", not {mode}")
    if mode == FASTV and not fastv:
        raise ValueError("--mode fastv needs --fastv-layer K and --fastv-keep R")
    if fastv and mode != FASTV:
        raise ValueError(f"--fastv-layer / --fastv-keep go with --mode fastv, not {mode}")
    for layer, share in fastv:
        if not 0 < share <= 1:
            raise ValueError(f"--fastv-keep {share:g}: the share of image tokens kept must be in (0, 1]")
        if layer < 1:
            raise ValueError(f"--fastv-layer {layer}: must be at least 1 (the layers before it see every token)")


def all_heads(ranking: pd.DataFrame) -> list[Head]:
    """Every head of a ranking's softmax-attention layers (the heads a keep-only point can keep)."""
    layers = ranking.attrs.get("attention_layers")
    layers = range(int(ranking.attrs["layers"])) if layers is None else layers
    return [(int(layer), head) for layer in layers for head in range(int(ranking.attrs["heads"]))]


def keep_plan(ranking: pd.DataFrame, tag: str, mode: str, selectors: Sequence[str] = ("top", "random"),
              ks: Sequence[int] = (4, 8, 16), seeds: int = 3, sets: Sequence[str] = (),
              renamed: dict[str, tuple[str, str]] | None = None) -> list[Point]:
    """Keep-only points over a ranking (`head_table` of the source run): for each selector and K, the K heads it
    picks keep the image and every other head is `mode` (image-blind or flow-blind); random once per seed.

    The ends are always there, shared by every selector: K = 0 (every head blind, a check that the image matters)
    and K = all heads (no head blind: the plain run). `sets` adds fixed head sets, one point each at K = their
    size: `stage:NAME` or an `L.H,...` list. `renamed` maps a selector to the (label, stem) its points record as
    their selector and take as their names (`{tag}-{stem}{K}`)."""
    check_pruning(mode, True, ())
    unknown = [s for s in selectors if s not in CURVE_SELECTORS]
    if unknown:
        raise ValueError(f"unknown selector {unknown[0]!r} for --keep; expected {', '.join(CURVE_SELECTORS)}, "
                         "stage:NAME or L.H,...")
    if seeds < 1:
        raise ValueError(f"--seeds must be at least 1, got {seeds}")
    heads = all_heads(ranking)
    total = len(heads)
    bad = [k for k in ks if not 0 <= k <= total]
    if bad:
        raise ValueError(f"--k {bad[0]}: a keep-only K is between 0 and the {total} heads")
    layers, per_layer = int(ranking.attrs["layers"]), int(ranking.attrs["heads"])

    def point(selector: str, kept: list[Head], name: str, seed: int | None = None, k: int | None = None) -> Point:
        chosen = set(kept)
        return Point(selector, len(chosen) if k is None else k, seed, [h for h in heads if h not in chosen], name,
                     mode, sorted(chosen))

    points = [point(BASELINE, [], f"{tag}-k0"), point(BASELINE, heads, f"{tag}-k{total}")]
    inner = sorted({k for k in ks if 0 < k < total})
    for selector in dict.fromkeys(selectors):
        for k in inner:
            if selector == "random":
                points += [point(selector, select_heads(f"random:{k}:{seed}", ranking, layers, per_layer),
                                 f"{tag}-random{k}-s{seed}", seed) for seed in range(seeds)]
            else:
                label, stem = (renamed or {}).get(selector, (selector, selector))
                points.append(point(label, select_heads(f"{selector}:{k}", ranking, layers, per_layer),
                                    f"{tag}-{stem}{k}"))
    for spec in dict.fromkeys(canonical(s) for s in sets):
        if is_selector(spec) and not spec.startswith("stage:"):
            raise ValueError(f"--keep {spec}: a fixed head set is stage:NAME or L.H,...; selectors with K go "
                             "without it (--keep top --k 8)")
        kept = select_heads(spec, ranking, layers, per_layer)
        slug = spec.replace(":", "-") if spec.startswith("stage:") else \
            "set-" + hashlib.sha1(spec.encode()).hexdigest()[:8]
        points.append(point(spec, kept, f"{tag}-{slug}"))
    return points


def fastv_plan(tag: str, fastv: Sequence[tuple[int, float]]) -> list[Point]:
    """FastV points: for each (layer K, share R), one run with no head ablated; K is the point's K."""
    check_pruning(FASTV, False, fastv)
    return [Point(FASTV, int(layer), None, [], f"{tag}-l{int(layer)}-r{share:g}", FASTV, None,
                  (int(layer), float(share))) for layer, share in dict.fromkeys(fastv)]


SUMMARY_COLUMNS = ["mode", "selector", "full", "k_90", "share_90", "k_full", "share_full", "gap_random",
                   "max_gap_random", "curve"]


def keep_summary(points: pd.DataFrame, fraction: float = 0.9) -> pd.DataFrame:
    """How few heads need the image, per keep-only curve and selector, from `curve_points` rows.

    full: accuracy of the plain run (K = all heads); k_90 / share_90: the least K (and its image KV share) whose
    accuracy reaches `fraction` of full; k_full / share_full: the least K whose 95% interval reaches full;
    gap_random / max_gap_random: the mean and largest accuracy lead over random heads (mean over seeds) at the
    K both have strictly between 0 and all heads (NaN for random itself or without random points)."""
    rows = []
    means = points[points["seed"].map(lambda s: s is None or pd.isna(s)) & points["kept"].notna()
                   | points["selector"].eq("random") & points["seed"].map(lambda s: s is None or pd.isna(s))]
    means = means[means["mode"].isin(PRUNING_MODES)]
    for (curve, mode), group in means.groupby(["curve", "mode"], sort=False):
        total = int(group["k"].max())
        plain = group[group["k"] == total]["accuracy"]
        full = float(plain.iloc[0]) if len(plain) else float("nan")
        random = group[group["selector"] == "random"].set_index("k")["accuracy"]
        for selector, line in group.groupby("selector", sort=False):
            line = line.drop_duplicates("k", keep="last").sort_values("k")
            reach = line[line["accuracy"] >= fraction * full]
            whole = line[line["high"] >= full]
            inner = [k for k in line["k"] if 0 < k < total and k in random.index]
            gaps = [float(line.set_index("k")["accuracy"][k] - random[k]) for k in inner] \
                if selector != "random" else []
            rows.append({"mode": mode, "selector": selector, "full": full,
                         "k_90": int(reach["k"].iloc[0]) if len(reach) else None,
                         "share_90": float(reach["image_kv_share"].iloc[0]) if len(reach) else float("nan"),
                         "k_full": int(whole["k"].iloc[0]) if len(whole) else None,
                         "share_full": float(whole["image_kv_share"].iloc[0]) if len(whole) else float("nan"),
                         "gap_random": float(np.mean(gaps)) if gaps else float("nan"),
                         "max_gap_random": float(np.max(gaps)) if gaps else float("nan"), "curve": curve})
    return pd.DataFrame(rows, columns=SUMMARY_COLUMNS)
