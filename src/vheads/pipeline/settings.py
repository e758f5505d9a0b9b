"""Run settings: which options define a run, and how a stored run's settings are reused, compared and named.

A run's settings are its `RunConfig` fields as stored in `runs.config`. `--resume` and `ablate --from RUN` start
from a stored run's settings and let only the options given explicitly change them; `merge` folds runs whose
defining settings agree. A stored run's defining settings never change: `mismatches` is the one check that
`vheads run --resume` and `vheads sweep` make before adding samples to a run.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
from dataclasses import asdict, fields, replace
from pathlib import Path
from typing import Any, TypeVar

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
_TUPLES = ("stages", "shard")

Config = TypeVar("Config")


def plain(value: Any) -> Any:
    """A value as it reads back from the store's JSON (tuples become lists)."""
    return json.loads(json.dumps(value, default=str))


def stored_settings(config: Any) -> dict[str, Any]:
    """The settings `runs.config` keeps for a run of `config`."""
    return {k: v for k, v in asdict(config).items() if k not in NOT_STORED}


def given_fields(config: Any) -> set[str]:
    """Options given explicitly: `config.explicit`, or where that is None, every field that differs from its
    default (the Python API)."""
    if getattr(config, "explicit", None) is not None:
        return set(config.explicit)
    defaults = type(config)()
    return {f.name for f in fields(config) if plain(getattr(config, f.name)) != plain(getattr(defaults, f.name))}


def inherit(config: Config, stored: Mapping[str, Any], names: Iterable[str]) -> Config:
    """`config` with each field of `names` that was not given explicitly taken from a stored run's settings; the
    fields taken count as given after (a preset applied later does not override them)."""
    given = given_fields(config)
    values = {name: restore(name, stored[name]) for name in names if name in stored and name not in given}
    return replace(config, **values, explicit=tuple(sorted(given | set(values))))


def restore(name: str, value: Any) -> Any:
    """A stored setting back in its `RunConfig` type (JSON has no tuples)."""
    if value is None:
        return None
    if name in _TUPLES:
        return tuple(int(v) for v in value)
    if name == "ablate":
        return [(int(layer), int(head)) for layer, head in value]
    return value


def mismatches(config: Any, stored: Mapping[str, Any], resolved: Mapping[str, Any] | None = None) -> list[str]:
    """The defining settings of `config` that differ from a stored run's, as `--opt new (the run has old)`.

    Settings the stored run does not record (older stores) are not compared, nor the stages when `config` leaves
    them to the model's depth. `resolved` gives what a default (None) of the run became, for the message.
    """
    resolved = resolved or {}
    found = []
    for name in DEFINING:
        if name not in stored or (name == "stages" and getattr(config, name) is None):
            continue
        value, old = plain(getattr(config, name)), plain(stored[name])
        if value == old:
            continue
        had = _show(old) if old is not None else "the default" + (f", {resolved[name]}" if name in resolved else "")
        option = f"--{name.replace('_', '-')}"
        found.append(f"{option} {_show(value)} (the run has {had})" if value is not None else
                     f"no {option} (the run has {had})")
    return found


def differences(a: Mapping[str, Any] | None, b: Mapping[str, Any] | None) -> list[str]:
    """Defining settings that two stored runs both record with different values, as `name a != b`."""
    a, b = a or {}, b or {}
    return [f"{name} {_show(a[name])} != {_show(b[name])}" for name in DEFINING
            if name in a and name in b and plain(a[name]) != plain(b[name])]


def digest(config: Any) -> str:
    """Six hex digits of a run's defining settings: equal settings, equal digest."""
    settings = {name: plain(getattr(config, name)) for name in DEFINING
                if not (name in UNSET_UNDIGESTED and getattr(config, name, None) is None)}
    return hashlib.sha1(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:6]


def with_preset(config: Config) -> Config:
    """`config` with its preset's values on the options not given explicitly (those count as given after)."""
    preset = getattr(config, "preset", None)
    if preset is None:
        return config
    if preset not in PRESETS:
        raise ValueError(f"unknown --preset {preset!r}; expected one of {', '.join(PRESETS)}")
    given = given_fields(config)
    values = {k: v for k, v in PRESETS[preset].items() if k not in given}
    return replace(config, **values, explicit=tuple(sorted(given | set(values))))


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


def _show(value: Any) -> str:
    value = plain(value)
    if isinstance(value, list):
        return ",".join(".".join(map(str, v)) if isinstance(v, list) else str(v) for v in value) or "none"
    return "default" if value is None else str(value)
