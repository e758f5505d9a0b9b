"""Head selectors of DESIGN.md, turned into the (layer, head) lists that `--ablate` and a curve remove.

`top:K` the K best heads of a run's ranking; `random:K[:seed]` K heads drawn from all heads with the seed;
`late:K` the K lowest-scoring heads of the late stage; `stage:early|mid|late` every head of a stage;
`pointing:K` the K heads of a run that most often point at a target; `region:K` the K heads with the highest mean
region share (the share of their image attention on the asked-about box); `cost:K` the K heads whose ablation alone
costs the most accuracy (`analysis.costs`, from a stored `vheads ablate --each` curve); `localization:K` Kang et al.'s
localization heads of a run (`analysis.localization`); `L.H,L.H` an explicit list. Random sets are nested: for
one seed, the K = 4 set is part of the K = 8 set.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from vheads import metrics
from vheads.analysis.localization import localization_heads
from vheads.analysis.ranking import attention_heads, by_pointing, head_table, no_readout_hint, weights_array
from vheads.heads import Head, format_heads, missing_heads, parse_heads
from vheads.store import Store

# The selectors a curve runs by default, and every selector a curve can run (one head set per K).
DEFAULT_CURVE = ("top", "random", "late")
CURVE_SELECTORS = (*DEFAULT_CURVE, "pointing", "region", "cost")
NEEDS_RUN = ("top", "late", "pointing", "region", "cost", "localization")
SELECTORS = (*CURVE_SELECTORS, "stage", "localization")
EXPECTED = "top:K, random:K[:seed], late:K, stage:NAME, pointing:K, region:K, cost:K, localization:K or L.H,..."


def is_selector(spec: str | None) -> bool:
    """Whether an `--ablate` value is a selector (`top:8`, `stage:late`, ...) rather than an `L.H` list."""
    return bool(spec) and spec.strip().split(":")[0] in SELECTORS


def canonical(spec: str) -> str:
    """The one spelling of a selector or `L.H` list, the text stored and compared: `random:4`, `random:4:0` and
    `random:04:00` are all `random:4` (seed 0 left out), `top:08` is `top:8`, `2.3, 0.1,2.3` is `0.1,2.3`.

    Raises ValueError for text that is no selector; checks against a run (K too large) are `resolve_heads`'s."""
    text = (spec or "").strip()
    if not text:
        raise ValueError(f"empty head selector; expected {EXPECTED}")
    if not is_selector(text):
        if ":" in text:
            raise ValueError(f"unknown selector {text!r}; expected {EXPECTED}")
        return format_heads(sorted(set(parse_heads(text))))
    kind, *args = (part.strip() for part in text.split(":"))
    if kind == "stage":
        return ":".join((kind, *args))
    if kind == "random" and len(args) in (1, 2):
        k, seed = _int(text, args[0], "K"), _int(text, args[1], "seed") if len(args) == 2 else 0
        return f"random:{k}" if seed == 0 else f"random:{k}:{seed}"
    if len(args) == 1:
        return f"{kind}:{_int(text, args[0], 'K')}"
    return text


def resolve_heads(spec: str, store: Store | None = None, from_run: str | int | None = None,
                  layers: int | None = None, heads: int | None = None,
                  stages: tuple[int, int] | None = None, attention_layers: list[int] | None = None,
                  mode: str | None = None) -> list[Head]:
    """The heads a selector or `L.H` list names, for a model of `layers` x `heads` heads.

    `attention_layers` (default: every layer; a run's own list with `from_run`) limits `random` and `stage` to
    the layers with softmax attention, as a hybrid decoder's other layers have no heads to ablate.

    `top` and `late` rank the heads of `from_run` (read from `store`); with a run, the grid defaults to its own and
    the stages to its stored `--stages` (`stages` overrides them). `cost` reads the run's each-head costs in
    ablation `mode` (any, if only one was measured). Raises ValueError saying what is wrong.
    """
    text = (spec or "").strip()
    if not text:
        raise ValueError(f"empty head selector; expected {EXPECTED}")
    kind = text.split(":")[0]
    if kind in NEEDS_RUN and (store is None or from_run is None):
        raise ValueError(f"{text}: `{kind}` ranks the heads of a run; pass --from RUN")
    table = None
    if store is not None and from_run is not None:
        layers, heads = _grid(store, from_run, layers, heads)
        attention_layers = (store.run(from_run)["config"] or {}).get("attention_layers", attention_layers)
        if kind in NEEDS_RUN:
            table = head_table(store, from_run, stages=stages)
            check_ranked(table, from_run)
            if kind == "cost":
                from vheads.analysis.costs import head_costs, with_costs

                table = with_costs(table, head_costs(store, from_run, mode, strict=False))
        elif stages is None:
            stages = head_table(store, from_run).attrs["stages"]
        if kind == "localization":
            return run_localization_heads(store, from_run, _single_count(text, len(table)))
    return select_heads(text, table, layers, heads, stages, attention_layers)


def run_localization_heads(store: Store, run: str | int, k: int) -> list[Head]:
    """`localization:K` on a run: Kang et al.'s rule on its mean W and per-sample spatial entropies."""
    w, _ = weights_array(store, run, "visual_weight")
    entropy, _ = weights_array(store, run, "spatial_entropy")
    if not np.isfinite(entropy).any():
        raise ValueError(f"localization:{k}: run {run} has no spatial entropies (the model's image tokens have no "
                         "patch layout, or the run was stored before vheads recorded them)")
    measured = attention_heads(store.run(run), w, w.shape[1], w.shape[2])
    return localization_heads(metrics.nanmean(w), entropy, measured, k)


def check_ranked(table: pd.DataFrame, run: str | int) -> None:
    """ValueError unless the ranking has samples with a defined head score."""
    if table.attrs["samples"] == 0:
        raise ValueError(f"run {run} has no samples to rank heads by")
    hint = no_readout_hint(table)
    if hint:
        raise ValueError(f"run {run}: {hint}")


def select_heads(spec: str, ranking: pd.DataFrame | None, layers: int | None, heads: int | None,
                 stages: tuple[int, int] | None = None, attention_layers: list[int] | None = None) -> list[Head]:
    """`resolve_heads` on a ranking already at hand (a `head_table`), so a curve ranks its source run once.

    Stages: `stages`, else the ranking's, else thirds."""
    text = spec.strip()
    if stages is None and ranking is not None:
        stages = ranking.attrs.get("stages")
    if stages is not None and layers is not None:
        stages = metrics.check_stages(stages, layers)
    if attention_layers is None and ranking is not None:
        attention_layers = ranking.attrs.get("attention_layers")
    if not is_selector(text):
        if ":" in text:
            raise ValueError(f"unknown selector {text!r}; expected {EXPECTED}")
        return _explicit(text, layers, heads)
    kind, *args = text.split(":")
    if layers is None or heads is None:
        raise ValueError(f"{text}: the model's layers x heads are needed to resolve it")
    if kind == "stage":
        if len(args) != 1 or args[0] not in metrics.STAGES:
            raise ValueError(f"{text}: expected stage:early, stage:mid or stage:late")
        return [(layer, head) for layer in metrics.stage_layers(args[0], layers, stages) for head in range(heads)
                if attention_layers is None or layer in attention_layers]
    if kind == "random":
        if len(args) not in (1, 2):
            raise ValueError(f"{text}: expected random:K or random:K:SEED")
        usable = layers if attention_layers is None else len(attention_layers)
        k = _count(text, args[0], usable * heads)
        seed = _int(text, args[1], "seed") if len(args) == 2 else 0
        return random_heads(k, layers, heads, seed, attention_layers)
    if len(args) != 1:
        raise ValueError(f"{text}: expected {kind}:K")
    if ranking is None or kind == "localization":
        raise ValueError(f"{text}: `{kind}` needs the ranking of a run; pass --from RUN")
    ranked = [(int(r.layer), int(r.head)) for r in ranking.itertuples()]
    if kind == "top":
        return ranked[:_count(text, args[0], len(ranked))]
    if kind == "pointing":
        return pointing_heads(ranking, _count(text, args[0], len(ranked)), text)
    if kind == "region":
        return region_heads(ranking, _count(text, args[0], len(ranked)), text)
    if kind == "cost":
        return cost_heads(ranking, _count(text, args[0], len(ranked)), text)
    late = [h for h in ranked if metrics.stage_of(h[0], layers, stages) == "late"]
    return late[::-1][:_count(text, args[0], len(late))]


def pointing_heads(ranking: pd.DataFrame, k: int, spec: str = "pointing") -> list[Head]:
    """The K heads of a ranking with the highest pointing accuracy (ties: higher mean W, then lower layer and head);
    heads never measured on a target are left out."""
    ordered = by_pointing(ranking)
    if ordered.empty:
        raise ValueError(f"{spec}: the run has no pointing figures (its samples have no box, or the model's image "
                         "tokens have no patch layout)")
    return [(int(r.layer), int(r.head)) for r in ordered.head(k).itertuples()]


def region_heads(ranking: pd.DataFrame, k: int, spec: str = "region") -> list[Head]:
    """The K heads of a ranking with the highest mean region share (ties: higher mean W, then lower layer and
    head); heads never measured on a box are left out."""
    known = ranking[np.isfinite(ranking["mean_region_share"].to_numpy(dtype=float))]
    if known.empty:
        raise ValueError(f"{spec}: the run has no region figures (its samples have no box, or the model's image "
                         "tokens have no patch layout)")
    ordered = known.sort_values(["mean_region_share", "mean_w", "layer", "head"],
                                ascending=[False, False, True, True])
    return [(int(r.layer), int(r.head)) for r in ordered.head(k).itertuples()]


def cost_heads(ranking: pd.DataFrame, k: int, spec: str = "cost") -> list[Head]:
    """The K heads of a ranking whose ablation alone costs the most accuracy, in `analysis.costs.order_costs`'s
    order (the `cost_rank` that `with_costs` adds); unmeasured heads are left out."""
    if "cost_rank" not in ranking:
        raise ValueError(f"{spec}: cost ranks heads by what each costs when ablated alone; run `vheads ablate "
                         "--from RUN --each --mode MODE` first")
    known = ranking[np.isfinite(ranking["ablation_cost"].to_numpy(dtype=float))]
    if known.empty:
        raise ValueError(f"{spec}: no head of the run has a measured ablation cost")
    if k > len(known):
        raise ValueError(f"{spec}: only {len(known)} heads have a measured ablation cost (`vheads ablate --each` "
                         "without --each-of measures every head)")
    return [(int(r.layer), int(r.head)) for r in known.sort_values("cost_rank").head(k).itertuples()]


def random_heads(k: int, layers: int, heads: int, seed: int = 0,
                 attention_layers: list[int] | None = None) -> list[Head]:
    """K heads drawn without replacement from all layers x heads (or those of `attention_layers`) with `seed`,
    sorted; nested across K."""
    rows = list(range(layers)) if attention_layers is None else [int(i) for i in attention_layers]
    order = np.random.default_rng(seed).permutation(len(rows) * heads)[:k]
    return sorted((rows[int(i // heads)], int(i % heads)) for i in order)


def _grid(store: Store, from_run: str | int, layers: int | None, heads: int | None) -> tuple[int, int]:
    info = store.run(from_run)
    run_layers, run_heads = int(info["layers"]), int(info["heads"])
    if (layers, heads) != (None, None) and (layers, heads) != (run_layers, run_heads):
        raise ValueError(f"run {info['name']} has {run_layers} x {run_heads} heads but the model has "
                         f"{layers} x {heads}")
    return run_layers, run_heads


def _single_count(spec: str, available: int) -> int:
    """K of a `kind:K` selector, checked."""
    parts = spec.split(":")
    if len(parts) != 2:
        raise ValueError(f"{spec}: expected {parts[0]}:K")
    return _count(spec, parts[1], available)


def _count(spec: str, text: str, available: int) -> int:
    k = _int(spec, text, "K")
    if k < 0 or k > available:
        raise ValueError(f"{spec}: K must be between 0 and {available}")
    return k


def _int(spec: str, text: str, what: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"{spec}: {what} {text!r} is not a whole number") from None


def _explicit(text: str, layers: int | None, heads: int | None) -> list[Head]:
    chosen = parse_heads(text)
    if layers is not None and heads is not None:
        bad = missing_heads(chosen, layers, heads)
        if bad:
            raise ValueError(f"heads {', '.join(bad)} do not exist ({layers} layers x {heads} heads)")
    return chosen


def run_option_heads(spec: str | None, from_run: str | None, store_path: str, model: str | None,
                     trust_remote_code: bool = False, stages: tuple[int, int] | None = None,
                     mode: str | None = None) -> list[Head]:
    """`vheads run --ablate SPEC [--from RUN]`: an `L.H` list, or a selector resolved on the source run's ranking
    (or, for random / stage without --from, on the model's layers x heads read from its config)."""
    if not spec:
        if from_run:
            raise ValueError("--from names the run whose heads a selector ranks; pass --ablate top:K (or late:K)")
        return []
    if from_run:
        with Store(store_path, read_only=True) as store:
            return resolve_heads(spec, store, from_run, stages=stages, mode=mode)
    if is_selector(spec) and spec.split(":")[0] not in NEEDS_RUN:
        layers, heads, attention = model_layers(model, trust_remote_code)
        return resolve_heads(spec, None, None, layers, heads, stages=stages, attention_layers=attention)
    return resolve_heads(spec)


def model_grid(model: str | None, trust_remote_code: bool = False) -> tuple[int, int]:
    """Language-model layers x heads from a model's config alone (no weights loaded)."""
    layers, heads, _ = model_layers(model, trust_remote_code)
    return layers, heads


def model_layers(model: str | None, trust_remote_code: bool = False) -> tuple[int, int, list[int]]:
    """Language-model layers, heads per layer and the layers with softmax attention, from the config alone."""
    from transformers import AutoConfig

    from vheads.models import ModelError
    from vheads.models.layers import config_attention_layers
    from vheads.models.loading import resolve

    ref, _ = resolve(model)
    try:
        text = AutoConfig.from_pretrained(ref, trust_remote_code=trust_remote_code).get_text_config()
    except Exception as exc:  # noqa: BLE001 - any config failure is one clear line
        raise ModelError(f"cannot read the config of {ref}: {str(exc).splitlines()[0]}") from exc
    return int(text.num_hidden_layers), int(text.num_attention_heads), config_attention_layers(text)
