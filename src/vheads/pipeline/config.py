"""`RunConfig`, the options of one run, and how they are prepared for it: checked, made absolute, the preset
applied, the stored run's settings taken over on --resume, and the run named."""

from __future__ import annotations

import difflib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from vheads import metrics
from vheads.data import Dataset, Sample, load_dataset
from vheads.data.images import DEFAULT_MAX_PIXELS
from vheads.heads import check_heads, format_heads
from vheads.models import Loaded, load
from vheads.models.layers import attention_layer_indices
from vheads.pipeline import settings as run_settings
from vheads.store import Store, StoreError, shard_path


@dataclass
class RunConfig:
    """Everything that defines a run (the command-line options of `vheads run`).

    `stages`: the first mid and the first late layer (None: thirds). `preset`: `paper` sets the reference code's
    choices (`settings.PRESETS`). `fastv_layer` / `fastv_keep`: FastV's K and R (after layer K only the R share of
    image tokens most attended by the last prompt row stays as keys), both or neither. `explicit`: the options
    the user gave explicitly, which --resume checks against the stored run and `ablate --from` keeps; None means
    every field that differs from its default.
    """

    model: str | None = None
    dataset: str = "shapes"
    data: str | None = None
    images: str | None = None
    split: str | None = None
    question_type: str | None = None
    prompt_style: str | None = None
    limit: int | None = None
    batch_size: int = 8
    max_new_tokens: int = 8
    readout: str = "prompt"
    ablate: list[tuple[int, int]] = field(default_factory=list)
    ablation: str = "zero"
    store: str = "vheads.duckdb"
    name: str | None = None
    shard: tuple[int, int] | None = None
    dtype: str = "auto"
    device: str = "auto"
    attn: str = "sdpa"
    resume: bool = False
    seed: int = 0
    trust_remote_code: bool = False
    curve: str | None = None
    tags: dict[str, Any] = field(default_factory=dict)
    max_pixels: int | None = DEFAULT_MAX_PIXELS
    stages: tuple[int, int] | None = None
    preset: str | None = None
    fastv_layer: int | None = None
    fastv_keep: float | None = None
    explicit: tuple[str, ...] | None = None

    @classmethod
    def of_run(cls, run: Mapping[str, Any]) -> RunConfig:
        """The config a stored run (`Store.run`) ran with, read back from its record: the one way a run is restored
        (replays for overlays and grounding; `--resume` and `ablate --from` take the same settings through
        `settings.inherit`). Its model is the one the run loaded; settings it did not store keep their defaults."""
        stored = run.get("config") or {}
        known = {f.name for f in fields(cls)}
        values = {name: run_settings.restore(name, value) for name, value in stored.items()
                  if name in known and name not in run_settings.NOT_STORED}
        return cls(**{**values, "model": run.get("model") or values.get("model"),
                      "dataset": values.get("dataset") or run.get("dataset") or cls.dataset, "name": run.get("name")})

    def load_dataset(self) -> Dataset:
        """The dataset these options name."""
        return load_dataset(self.dataset, data=self.data, images=self.images, split=self.split,
                            question_type=self.question_type, prompt_style=self.prompt_style, limit=self.limit,
                            seed=self.seed, max_pixels=self.max_pixels)

    def load_model(self) -> Loaded:
        """The model these options name, loaded for vheads."""
        return load(self.model, dtype=self.dtype, device=self.device, attn=self.attn,
                    trust_remote_code=self.trust_remote_code)

    def store_path(self) -> Path:
        """The store file this run writes (a shard writes its own file beside the store)."""
        path = Path(self.store)
        return shard_path(path, *self.shard) if self.shard else path


def head_grid(loaded: Loaded, ablated: Sequence[tuple[int, int]]) -> tuple[int, int, list[int]]:
    """The model's layers, heads per layer and softmax-attention layers, after checking that `ablated` names
    heads it has (ValueError otherwise)."""
    text = loaded.model.config.get_text_config()
    layers, heads = int(text.num_hidden_layers), int(text.num_attention_heads)
    attention_layers = attention_layer_indices(loaded.model)
    check_heads(ablated, layers, heads, attention_layers)
    return layers, heads, attention_layers


@dataclass
class PreparedRun:
    """What a run is, settled before its first batch: its config (resumed, preset applied, checked, stages set),
    its name, its dataset and model, the model's grid and the settings the store keeps for it."""

    config: RunConfig
    name: str
    dataset: Dataset
    loaded: Loaded
    layers: int
    heads: int
    attention_layers: list[int]
    settings: dict[str, Any]


def prepare_run(config: RunConfig, store: Store, loaded: Loaded | None = None,
                dataset: Dataset | None = None) -> PreparedRun:
    """Everything `pipeline.run` needs settled before it opens the run, in one place: `prepared` (paths, --resume,
    preset, checks), the dataset and model (loaded here unless given), the grid checked against the ablation, the
    stages, the name (`default_name` unless given) and the settings to store (`stored_run_settings`)."""
    config = prepared(config, store)
    dataset = dataset if dataset is not None else config.load_dataset()
    loaded = loaded if loaded is not None else config.load_model()
    layers, heads, attention_layers = head_grid(loaded, config.ablate)
    config = with_stages(config, layers)
    name = config.name or default_name(store, config, loaded.name, dataset.split)
    return PreparedRun(config, name, dataset, loaded, layers, heads, attention_layers,
                       stored_run_settings(config, layers, attention_layers))


# The least value of each numeric option (a study file's values are held to the same).
LEAST = {"limit": 1, "batch_size": 1, "max_new_tokens": 1, "seed": 0}


def check_config(config: RunConfig) -> None:
    """ValueError naming the first option whose value is out of range."""
    for name, low in LEAST.items():
        value = getattr(config, name)
        if value is not None and value < low:
            raise ValueError(f"--{name.replace('_', '-')} {value}: must be at least {low}")
    if (config.fastv_layer is None) != (config.fastv_keep is None):
        raise ValueError("--fastv-layer and --fastv-keep go together: FastV needs the layer K and the share R")
    if config.fastv_keep is not None and not 0 < config.fastv_keep <= 1:
        raise ValueError(f"--fastv-keep {config.fastv_keep}: the share of image tokens kept must be in (0, 1]")
    if config.fastv_layer is not None and config.ablate:
        raise ValueError("--fastv-layer prunes image tokens for every head: run it without --ablate")
    if config.fastv_layer is not None and config.fastv_layer < 1:
        raise ValueError(f"--fastv-layer {config.fastv_layer}: must be at least 1 (layers before it see every token)")
    if config.readout == "first-generated" and config.max_new_tokens < 2:
        raise ValueError("--readout first-generated reads the row of the second answer token: --max-new-tokens "
                         f"must be at least 2, got {config.max_new_tokens}")


def prepared(config: RunConfig, store: Store) -> RunConfig:
    """The config a run really uses: absolute paths, the preset applied, and with --resume the stored run's
    settings for every option not given explicitly (one that differs from the run's is a StoreError)."""
    config = replace(config, data=run_settings.absolute(config.data), images=run_settings.absolute(config.images),
                     model=run_settings.absolute(config.model))
    row = resume_target(store, config) if config.resume else None
    if row is not None:
        stored = row["config"] or {}
        skip = run_settings.EXECUTION + run_settings.NOT_STORED + run_settings.DERIVED
        keep = [n for n in stored if n not in skip]
        config = replace(run_settings.inherit(config, stored, keep), name=row["name"])
    config = run_settings.with_preset(config)
    check_config(config)
    if row is not None:
        resolved = run_defaults(store, row)
        config = restated(config, row["config"] or {}, resolved)
        check_same_run(row["name"], config, row["config"] or {}, resolved)
    return config


def check_same_run(name: str, config: RunConfig, stored: dict[str, Any], resolved: dict[str, Any] | None = None,
                   hint: str = "drop the option to continue it, or start a new --name") -> None:
    """StoreError naming every defining setting of `config` that differs from stored run `name`'s, then `hint`:
    samples are only ever added to a run of the same settings (`vheads run --resume` and `vheads sweep` ask here)."""
    found = run_settings.mismatches(config, stored, resolved)
    if found:
        raise StoreError(f"cannot resume run {name}: {'; '.join(found)}; {hint}")


def run_defaults(store: Store, row: dict[str, Any]) -> dict[str, Any]:
    """What a stored run's dataset made of the options it left to their default: its split and prompt style."""
    stored = row["config"] or {}
    resolved: dict[str, Any] = {}
    if stored.get("split") is None and row.get("split"):
        resolved["split"] = row["split"]
    if stored.get("prompt_style") is None:
        styles = store.query("SELECT DISTINCT prompt_style FROM samples WHERE run_id = ? AND prompt_style IS NOT "
                             "NULL", [row["run_id"]])["prompt_style"]
        if len(styles) == 1:
            resolved["prompt_style"] = str(styles.iloc[0])
    return resolved


def restated(config: RunConfig, stored: dict[str, Any], resolved: dict[str, Any]) -> RunConfig:
    """`config` with an option that restates what the run's default became (`--prompt-style visual` for a run
    left to ShapesQA's default, visual) set back to the run's own value, the default."""
    same = {name: None for name, value in resolved.items() if stored.get(name) is None
            and str(getattr(config, name) or "").strip().lower() == str(value).lower()}
    return replace(config, **same)


def resume_target(store: Store, config: RunConfig) -> dict[str, Any] | None:
    """The run --resume continues: the one named (StoreError naming nearby runs when there is none), else the
    latest of this model and dataset (None: a new run)."""
    runs = store.runs()
    names = [str(n) for n in runs["name"]]
    if config.name:
        if config.name in names:
            return store.run(config.name)
        near = difflib.get_close_matches(config.name, names, n=5, cutoff=0.6)
        known = (f"nearby: {', '.join(near)}" if near else
                 f"latest: {', '.join(names[-5:])}" if names else "the store has no run yet")
        raise StoreError(f"cannot resume: no run {config.name!r} in {store.path} ({known}); drop --resume to start "
                         "a new run")
    prefix = f"{Path(config.model).name if config.model else 'demo'}-{config.dataset}"
    matches = runs[runs["name"].map(lambda n: n == prefix or str(n).startswith(prefix + "-"))]
    return None if matches.empty else store.run(str(matches.sort_values("run_id").iloc[-1]["name"]))


def parse_shard(text: str | None) -> tuple[int, int] | None:
    """'2/4' -> (2, 4), the second of four contiguous shards."""
    if not text:
        return None
    try:
        k, n = (int(v) for v in text.split("/"))
    except ValueError:
        raise ValueError(f"--shard {text!r} is not K/N (e.g. 2/4)") from None
    if not 1 <= k <= n:
        raise ValueError(f"--shard {text!r}: K must be between 1 and N")
    return k, n


def with_stages(config: RunConfig, layers: int) -> RunConfig:
    """The stage boundaries checked against the model's depth; `--preset paper` fills in the reference's."""
    if config.stages is not None:
        return replace(config, stages=metrics.check_stages(config.stages, layers))
    if config.preset == "paper":
        return replace(config, stages=metrics.paper_stages(layers))
    return config


def stored_run_settings(config: RunConfig, layers: int, attention_layers: list[int]) -> dict[str, Any]:
    """What `runs.config` keeps for a run: its settings with the stages fixed for the model's depth, and the
    attention layers read off the model (see `settings.DERIVED`)."""
    return {**run_settings.stored_settings(with_stages(config, layers)), "attention_layers": attention_layers}


def shard_samples(samples: Sequence[Sample], shard: tuple[int, int] | None) -> list[Sample]:
    """The k-th of n contiguous chunks of ceil(len/n) samples (LLaVA's --num-chunks / --chunk-idx)."""
    if shard is None:
        return list(samples)
    k, n = shard
    size = -(-len(samples) // n)
    return list(samples[(k - 1) * size: k * size])


def base_name(model_label: str, config: RunConfig, split: str | None) -> str:
    """`<model>-<dataset>[-<split>][-<readout>][-<ablation>K]`: the name a run of these options gets by default."""
    parts = [model_label, config.dataset] + ([split] if split else [])
    if config.readout != "prompt":
        parts.append(config.readout)
    if config.ablate:
        parts.append(f"{config.ablation}{len(config.ablate)}")
    if config.fastv_layer is not None:
        parts.append(f"fastv{config.fastv_layer}-{config.fastv_keep:g}")
    return "-".join(parts)


def default_name(store: Store, config: RunConfig, model_name: str, split: str | None) -> str:
    """`base_name` of the run and the digest of its defining settings (`settings.digest`), so runs with other
    data, limit, seed or options never share a name; numbered while that name is taken."""
    base = f"{base_name(Path(model_name).name or 'model', config, split)}-{run_settings.digest(config)}"
    taken = set(store.runs()["name"])
    name, i = base, 2
    while name in taken:
        name, i = f"{base}-{i}", i + 1
    return name


def ablation_label(config: RunConfig) -> str:
    """The run's `ablation` column: 'none', 'MODE:L.H,L.H', or FastV's 'fastv:K:R' (after either, with both)."""
    parts = [f"{config.ablation}:" + format_heads(config.ablate)] if config.ablate else []
    if config.fastv_layer is not None:
        parts.append(f"fastv:{config.fastv_layer}:{config.fastv_keep:g}")
    return " ".join(parts) or "none"
