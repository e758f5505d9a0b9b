"""`RunConfig`, the options of one run, and what they know about themselves: which of them define the run, how a
stored run's settings are restored, reused and compared, the preset, the checks and the run's name.

A run's settings are its `RunConfig` fields as stored in `runs.config`. `--resume` and `ablate --from RUN` start
from a stored run's settings and let only the options given explicitly change them; `merge` folds runs whose
defining settings agree. A stored run's defining settings never change: `RunConfig.mismatches` is the one check
that `vheads run --resume` and `vheads sweep` make before adding samples to a run. `prepare_run` settles a run
before its first batch; `vheads sweep`'s workers settle theirs with `settle`, its second half.
"""

from __future__ import annotations

import difflib
import hashlib
import json
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vheads import metrics
from vheads.data import Dataset, Sample, load_dataset
from vheads.data.images import DEFAULT_MAX_PIXELS
from vheads.heads import check_heads, format_heads
from vheads.pipeline.pruning import run_image_kv
from vheads.store import Store, StoreError, shard_path

if TYPE_CHECKING:  # torch and transformers load with a run's model, not with its settings (`merge` reads these)
    from vheads.models import Loaded

# What a run measures: two runs with equal values of these are the same experiment (the samples, images and
# figures a run holds follow from them).
DEFINING = ("model", "dataset", "data", "images", "split", "question_type", "prompt_style", "limit", "seed",
            "max_pixels", "max_new_tokens", "readout", "ablate", "ablation", "dtype", "attn", "trust_remote_code",
            "stages", "preset", "fastv_layer", "fastv_keep")
# Defining settings left out of a run's digest while unset, so runs named before they existed keep their names.
UNSET_UNDIGESTED = ("fastv_layer", "fastv_keep")
# How it is computed: free to change on --resume, between shards.
EXECUTION = ("batch_size", "device", "shard", "curve")
NOT_STORED = ("store", "name", "resume", "tags", "explicit")
# Read off the model when a run starts, not chosen by the user.
DERIVED = ("attention_layers",)
# What `ablate --from RUN` does not take from RUN: the curve sets its own heads, mode, FastV point and tag.
NOT_INHERITED = ("ablate", "ablation", "fastv_layer", "fastv_keep", "shard", "curve", *DERIVED)
# `--preset paper`: the reference code's choices (stages are set from the model's depth when the run starts).
PRESETS: dict[str, dict[str, Any]] = {"paper": {"readout": "first-generated", "max_new_tokens": 128}}
# The least value of each numeric option (a study file's values are held to the same).
LEAST = {"limit": 1, "batch_size": 1, "max_new_tokens": 1, "seed": 0}
_TUPLES = ("stages", "shard")


@dataclass
class RunConfig:
    """Everything that defines a run (the command-line options of `vheads run`).

    `stages`: the first mid and the first late layer (None: thirds). `preset`: `paper` sets the reference code's
    choices (`PRESETS`). `fastv_layer` / `fastv_keep`: FastV's K and R (after layer K only the R share of image tokens
    most attended by the last prompt row stays as keys), both or neither. `explicit`: the options the user gave
    explicitly, which --resume checks against the stored run and `ablate --from` keeps; None means every field that
    differs from its default.
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
        `inherit`). Its model is the one the run loaded; settings it did not store keep their defaults."""
        stored = run.get("config") or {}
        known = {f.name for f in fields(cls)}
        values = {name: restore(name, value) for name, value in stored.items()
                  if name in known and name not in NOT_STORED}
        return cls(**{**values, "model": run.get("model") or values.get("model"),
                      "dataset": values.get("dataset") or run.get("dataset") or cls.dataset, "name": run.get("name")})

    def given(self) -> set[str]:
        """Options given explicitly: `explicit`, or where that is None, every field that differs from its default
        (the Python API)."""
        if self.explicit is not None:
            return set(self.explicit)
        defaults = type(self)()
        return {f.name for f in fields(self) if plain(getattr(self, f.name)) != plain(getattr(defaults, f.name))}

    def inherit(self, stored: Mapping[str, Any], skip: Iterable[str] = ()) -> RunConfig:
        """This config with each stored setting of a run that was not given explicitly taken from it, but those of
        `skip` (and those never stored); the settings taken count as given after (a preset applied later does not
        override them)."""
        given, skipped = self.given(), set(skip) | set(NOT_STORED)
        values = {name: restore(name, value) for name, value in stored.items()
                  if name not in given and name not in skipped}
        return replace(self, **values, explicit=tuple(sorted(given | set(values))))

    def with_preset(self) -> RunConfig:
        """This config with its preset's values on the options not given explicitly (those count as given after)."""
        if self.preset is None:
            return self
        if self.preset not in PRESETS:
            raise ValueError(f"unknown --preset {self.preset!r}; expected one of {', '.join(PRESETS)}")
        given = self.given()
        values = {k: v for k, v in PRESETS[self.preset].items() if k not in given}
        return replace(self, **values, explicit=tuple(sorted(given | set(values))))

    def check(self) -> None:
        """ValueError naming the first option whose value is out of range."""
        for name, low in LEAST.items():
            value = getattr(self, name)
            if value is not None and value < low:
                raise ValueError(f"--{name.replace('_', '-')} {value}: must be at least {low}")
        if (self.fastv_layer is None) != (self.fastv_keep is None):
            raise ValueError("--fastv-layer and --fastv-keep go together: FastV needs the layer K and the share R")
        if self.fastv_keep is not None and not 0 < self.fastv_keep <= 1:
            raise ValueError(f"--fastv-keep {self.fastv_keep}: the share of image tokens kept must be in (0, 1]")
        if self.fastv_layer is not None and self.ablate:
            raise ValueError("--fastv-layer prunes image tokens for every head: run it without --ablate")
        if self.fastv_layer is not None and self.fastv_layer < 1:
            raise ValueError(f"--fastv-layer {self.fastv_layer}: must be at least 1 (layers before it see every token)")
        if self.readout == "first-generated" and self.max_new_tokens < 2:
            raise ValueError("--readout first-generated reads the row of the second answer token: --max-new-tokens "
                             f"must be at least 2, got {self.max_new_tokens}")

    def mismatches(self, stored: Mapping[str, Any], resolved: Mapping[str, Any] | None = None) -> list[str]:
        """The defining settings that differ from a stored run's, as `--opt new (the run has old)`.

        Settings the stored run does not record (older stores) are not compared, nor the stages when this config
        leaves them to the model's depth. `resolved` gives what a default (None) of the run became, for the message.
        """
        resolved = resolved or {}
        found = []
        for name in DEFINING:
            if name not in stored or (name == "stages" and self.stages is None):
                continue
            value, old = plain(getattr(self, name)), plain(stored[name])
            if value == old:
                continue
            had = _show(old) if old is not None else "the default" + (f", {resolved[name]}" if name in resolved else "")
            option = f"--{name.replace('_', '-')}"
            found.append(f"{option} {_show(value)} (the run has {had})" if value is not None else
                         f"no {option} (the run has {had})")
        return found

    def settings(self) -> dict[str, Any]:
        """The settings `runs.config` keeps for a run of this config."""
        return {k: v for k, v in asdict(self).items() if k not in NOT_STORED}

    def digest(self) -> str:
        """Six hex digits of the defining settings: equal settings, equal digest."""
        settings = {name: plain(getattr(self, name)) for name in DEFINING
                    if not (name in UNSET_UNDIGESTED and getattr(self, name) is None)}
        return hashlib.sha1(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:6]

    def base_name(self, model_label: str, split: str | None) -> str:
        """`<model>-<dataset>[-<split>][-<readout>][-<ablation>K]`: the start of the run's default name."""
        parts = [model_label, self.dataset] + ([split] if split else [])
        if self.readout != "prompt":
            parts.append(self.readout)
        if self.ablate:
            parts.append(f"{self.ablation}{len(self.ablate)}")
        if self.fastv_layer is not None:
            parts.append(f"fastv{self.fastv_layer}-{self.fastv_keep:g}")
        return "-".join(parts)

    def ablation_label(self) -> str:
        """The run's `ablation` column: 'none', 'MODE:L.H,L.H', or FastV's 'fastv:K:R' (after either, with both)."""
        parts = [f"{self.ablation}:" + format_heads(self.ablate)] if self.ablate else []
        if self.fastv_layer is not None:
            parts.append(f"fastv:{self.fastv_layer}:{self.fastv_keep:g}")
        return " ".join(parts) or "none"

    def default_name(self, model_name: str, split: str | None, taken: Collection[str] = ()) -> str:
        """`base_name` and the `digest`, so runs with other data, limit, seed or options never share a name;
        numbered while that name is `taken`."""
        base = f"{self.base_name(Path(model_name).name or 'model', split)}-{self.digest()}"
        name, i = base, 2
        while name in taken:
            name, i = f"{base}-{i}", i + 1
        return name

    def load_dataset(self) -> Dataset:
        """The dataset these options name."""
        return load_dataset(self.dataset, data=self.data, images=self.images, split=self.split,
                            question_type=self.question_type, prompt_style=self.prompt_style, limit=self.limit,
                            seed=self.seed, max_pixels=self.max_pixels)

    def load_model(self) -> Loaded:
        """The model these options name, loaded for vheads."""
        from vheads.models import load

        return load(self.model, dtype=self.dtype, device=self.device, attn=self.attn,
                    trust_remote_code=self.trust_remote_code)

    def store_path(self) -> Path:
        """The store file this run writes (a shard writes its own file beside the store)."""
        path = Path(self.store)
        return shard_path(path, *self.shard) if self.shard else path


def plain(value: Any) -> Any:
    """A value as it reads back from the store's JSON (tuples become lists)."""
    return json.loads(json.dumps(value, default=str))


def restore(name: str, value: Any) -> Any:
    """A stored setting back in its `RunConfig` type (JSON has no tuples)."""
    if value is None:
        return None
    if name in _TUPLES:
        return tuple(int(v) for v in value)
    if name == "ablate":
        return [(int(layer), int(head)) for layer, head in value]
    return value


def differences(a: Mapping[str, Any] | None, b: Mapping[str, Any] | None) -> list[str]:
    """Defining settings that two stored runs both record with different values, as `name a != b` (what `merge`
    refuses to fold)."""
    a, b = a or {}, b or {}
    return [f"{name} {_show(a[name])} != {_show(b[name])}" for name in DEFINING
            if name in a and name in b and plain(a[name]) != plain(b[name])]


def _show(value: Any) -> str:
    value = plain(value)
    if isinstance(value, list):
        return ",".join(".".join(map(str, v)) if isinstance(v, list) else str(v) for v in value) or "none"
    return "default" if value is None else str(value)


@dataclass
class PreparedRun:
    """What a run is, settled before its first batch: its config (resumed, preset applied, checked, stages set),
    dataset, model and samples (its shard's), its name, and the row `Store.start_run` writes for it."""

    config: RunConfig
    dataset: Dataset
    loaded: Loaded
    samples: list[Sample]
    name: str
    row: dict[str, Any]


def prepare_run(config: RunConfig, store: Store, loaded: Loaded | None = None,
                dataset: Dataset | None = None) -> PreparedRun:
    """Everything `pipeline.run` needs settled before it opens the run, in one place: `prepared` (paths, --resume,
    preset, checks), the dataset and model (loaded here unless given), then `settle` on them (named in `store`)."""
    config = prepared(config, store)
    dataset = dataset if dataset is not None else config.load_dataset()
    loaded = loaded if loaded is not None else config.load_model()
    return settle(config, loaded, dataset, () if config.name else set(store.runs()["name"]))


def settle(config: RunConfig, loaded: Loaded, dataset: Dataset, taken: Collection[str] = ()) -> PreparedRun:
    """A prepared config on its model and dataset: the ablated heads and the stages checked against the model's grid
    (ValueError otherwise; `--preset paper` sets the reference's stages), the run named (`default_name` among
    `taken` unless the config names it), its shard's samples, and its row: the run's model and grid, its readout,
    its ablation (`ablation_label`), the settings it keeps with the model's attention layers, its curve, shard and
    tags (with, for a pruning run, the image KV it keeps: `pipeline.pruning.run_image_kv`)."""
    from vheads.models.layers import attention_layer_indices

    text = loaded.model.config.get_text_config()
    layers, heads = int(text.num_hidden_layers), int(text.num_attention_heads)
    attention_layers = attention_layer_indices(loaded.model)
    check_heads(config.ablate, layers, heads, attention_layers)
    if config.stages is not None:
        config = replace(config, stages=metrics.check_stages(config.stages, layers))
    elif config.preset == "paper":
        config = replace(config, stages=metrics.paper_stages(layers))
    name = config.name or config.default_name(loaded.name, dataset.split, taken)
    row = {"model": loaded.name, "family": loaded.family, "dataset": dataset.name, "split": dataset.split or "",
           "layers": layers, "heads": heads, "readout": config.readout, "ablation": config.ablation_label(),
           "config": {**config.settings(), "attention_layers": attention_layers}, "curve": config.curve,
           "shard": config.shard, "tags": {**(config.tags or {}), **run_image_kv(config, loaded.model.config, heads,
                                                                                  attention_layers)} or None}
    return PreparedRun(config, dataset, loaded, shard_samples(dataset.samples, config.shard), name, row)


def prepared(config: RunConfig, store: Store) -> RunConfig:
    """The config a run really uses: absolute paths, the preset applied, and with --resume the stored run's
    settings for every option not given explicitly (one that differs from the run's is a StoreError)."""
    config = replace(config, data=absolute(config.data), images=absolute(config.images),
                     model=absolute(config.model))
    row = resume_target(store, config) if config.resume else None
    if row is not None:
        config = replace(config.inherit(row["config"] or {}, skip=EXECUTION + DERIVED), name=row["name"])
    config = config.with_preset()
    config.check()
    if row is not None:
        resolved = run_defaults(store, row)
        config = restated(config, row["config"] or {}, resolved)
        check_same_run(row["name"], config, row["config"] or {}, resolved)
    return config


def check_same_run(name: str, config: RunConfig, stored: Mapping[str, Any],
                   resolved: Mapping[str, Any] | None = None,
                   hint: str = "drop the option to continue it, or start a new --name") -> None:
    """StoreError naming every defining setting of `config` that differs from stored run `name`'s, then `hint`:
    samples are only ever added to a run of the same settings (`vheads run --resume` and `vheads sweep` ask here)."""
    found = config.mismatches(stored, resolved)
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


def shard_samples(samples: Sequence[Sample], shard: tuple[int, int] | None) -> list[Sample]:
    """The k-th of n contiguous chunks of ceil(len/n) samples (LLaVA's --num-chunks / --chunk-idx)."""
    if shard is None:
        return list(samples)
    k, n = shard
    size = -(-len(samples) // n)
    return list(samples[(k - 1) * size: k * size])


def resolve(path: str, base: str | Path | None = None) -> str:
    """`path` (`~` expanded) made absolute against `base` (default: this folder); the one rule for every path option."""
    return str((Path(base or Path.cwd()) / Path(path).expanduser()).resolve())


def is_model_folder(model: str | None, base: str | Path | None = None) -> bool:
    """Whether `--model` names a folder rather than a hub id or the embedded demo: it exists against `base`, or it
    is written as a path ('.', '/', '~')."""
    if not model or model == "demo":
        return False
    return model.startswith((".", "/", "~")) or (Path(base or Path.cwd()) / Path(model).expanduser()).exists()


def absolute(path: str | None) -> str | None:
    """A data, image or model path made absolute when it names something on this machine (hub ids stay)."""
    if path is None or not Path(path).expanduser().exists():
        return path
    return resolve(path)
