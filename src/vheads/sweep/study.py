"""Study files: a sweep written down, models x datasets x prompt styles x readouts x ablations, in TOML (or YAML).

```toml
store = "study.duckdb"        # sweep settings: store, shards, retries, address, gpus_per_task, cpus_per_task
shards = 2
limit = 200                   # any `vheads run` option: the default of every run
models = ["demo", { model = "/models/llava-1.5-7b-hf", dtype = "bfloat16" }]
datasets = ["shapes", { dataset = "pope", data = "pope.jsonl", images = "coco/val2014", split = "random" }]
prompt_styles = ["visual", "plain"]
readouts = ["prompt", "generated"]
ablations = ["none", "top:5", { ablate = "random:5:1", ablation = "uniform" }]
```

Each axis entry is its main value or a table of any `vheads run` options; the runs are every combination, a
later axis overriding an earlier one. An `ablations` string is what `--ablate` takes (a `L.H` list or a
selector), or "none" for no ablation. Paths in the file (store, models that exist as folders, data, images)
are relative to the file's folder. Values are checked against the command-line options' types and ranges.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vheads.pipeline.config import is_model_folder, resolve

AXES = {"models": "model", "datasets": "dataset", "prompt_styles": "prompt_style", "readouts": "readout",
        "ablations": "ablate_heads"}
SETTINGS = ("shards", "retries", "address", "gpus_per_task", "cpus_per_task")
PATHS = ("store", "data", "images")


class StudyError(ValueError):
    """A study file that cannot be read; the message names the file and the key."""


@dataclass(frozen=True)
class Kind:
    """What a study value must be, as the command-line option takes it: its type(s), its least value (numbers)
    and whether it may be left empty (null in YAML)."""

    types: tuple[type, ...]
    least: float | None = None
    nullable: bool = True

    def check(self, key: str, value: Any) -> None:
        """ValueError naming `key` when `value` is not of this kind."""
        if value is None:
            if not self.nullable:
                raise ValueError(f"{key}: needs a value ({self.words()})")
            return
        numeric = float in self.types and isinstance(value, int)
        if isinstance(value, bool) != (bool in self.types) or not (isinstance(value, self.types) or numeric):
            raise ValueError(f"{key}: {_literal(value)} is not {self.words()}")
        if self.least is not None and value < self.least:
            raise ValueError(f"{key} {_literal(value)}: must be at least {self.least:g}")

    def words(self) -> str:
        """'an integer', 'a number', 'true or false', 'a string' (or several, joined by 'or')."""
        names = {int: "an integer", float: "a number", bool: "true or false", str: "a string", list: "a list"}
        return " or ".join(names.get(t, t.__name__) for t in self.types)


@dataclass
class Study:
    """A study file read: sweep settings, run options shared by every run, and the axes' entries."""

    settings: dict[str, Any] = field(default_factory=dict)
    base: dict[str, Any] = field(default_factory=dict)
    axes: dict[str, list[dict[str, Any]]] = field(default_factory=dict)


def parse_dataset(text: str) -> tuple[str, str | None]:
    """'pope:/data/pope.jsonl' -> ('pope', '/data/pope.jsonl'); a bare name has no data file."""
    name, _, data = str(text).strip().partition(":")
    if not name:
        raise ValueError(f"--datasets: {text!r} has no dataset name (NAME or NAME:PATH)")
    return name.lower(), data or None


def axis_entry(axis: str, value: Any, options: Mapping[str, str]) -> dict[str, Any]:
    """One entry of an axis as run options: 'pope:x.jsonl' -> {dataset: pope, data: x.jsonl}; 'none' ablates nothing."""
    if isinstance(value, Mapping):
        return {option_name(key, options, f"{axis} entry"): v for key, v in value.items()}
    main = AXES[axis]
    if main == "dataset":
        name, data = parse_dataset(value)
        return {"dataset": name, **({"data": data} if data else {})}
    if main == "ablate_heads" and str(value).strip().lower() in ("none", ""):
        return {"ablate_heads": None}
    return {main: value}


def option_name(key: str, options: Mapping[str, str], where: str) -> str:
    """The run option a key names ('max-new-tokens', 'max_new_tokens', 'from'); ValueError for an unknown key."""
    name = options.get(key) or options.get(key.replace("-", "_"))
    if name is None:
        raise ValueError(f"{where}: unknown option {key!r}")
    return name


def read_study(path: str | Path, options: Mapping[str, str], kinds: Mapping[str, Kind] | None = None) -> Study:
    """Read a study file; `options` maps every accepted spelling of a `vheads run` option to its name, `kinds`
    an option or sweep setting name to what its values must be (StudyError naming the file and key otherwise)."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise StudyError(f"cannot read study file {path}: {exc.strerror or exc}") from None
    raw = _parse(path, text)
    study = Study()
    try:
        for key, value in raw.items():
            name = key.replace("-", "_")
            if name in AXES:
                entries = value if isinstance(value, list) else [value]
                study.axes[name] = [_checked(name, entry, options, kinds) for entry in entries]
            elif name in SETTINGS:
                _check(key, name, value, kinds)
                study.settings[name] = value
            else:
                option = option_name(key, options, "top level")
                _check(key, option, value, kinds)
                study.base[option] = value
    except ValueError as exc:
        raise StudyError(f"study file {path}: {exc}") from None
    folder = path.resolve().parent
    study.base = _relative_to(study.base, folder)
    study.axes = {axis: [_relative_to(entry, folder) for entry in entries] for axis, entries in study.axes.items()}
    return study


def expand(base: Mapping[str, Any], axes: Mapping[str, Sequence[Mapping[str, Any]]]) -> list[dict[str, Any]]:
    """Every combination of the axes' entries, each over `base` (a later axis overrides an earlier one)."""
    lists = [entries for entries in axes.values() if entries]
    return [{k: v for part in (base, *combo) for k, v in part.items()} for combo in itertools.product(*lists)]


def given_keys(base: Iterable[str], axes: Mapping[str, Sequence[Mapping[str, Any]]]) -> list[set[str]]:
    """For each combination of `expand(..., axes)`, in its order, the options it sets: `base` and its entries' keys
    (what a preset must not override, whatever their value)."""
    lists = [entries for entries in axes.values() if entries]
    return [set(base).union(*combo) for combo in itertools.product(*lists)]


def _check(key: str, name: str, value: Any, kinds: Mapping[str, Kind] | None) -> None:
    """ValueError naming `key` (as the file spells it) when `value` is not what option `name` takes."""
    if kinds and name in kinds:
        kinds[name].check(key, value)


def _checked(axis: str, raw: Any, options: Mapping[str, str], kinds: Mapping[str, Kind] | None) -> dict[str, Any]:
    """An axis entry as run options, each value checked against what its option takes (ValueError naming the axis
    and the key)."""
    if isinstance(raw, Mapping):
        for key, value in raw.items():
            _check(f"{axis} entry: {key}", option_name(key, options, f"{axis} entry"), value, kinds)
    else:
        _check(f"{axis} entry", AXES[axis], raw, kinds)
    return axis_entry(axis, raw, options)


def _literal(value: Any) -> str:
    """A value as the study file writes it: 'forty', 3, true."""
    return str(value).lower() if isinstance(value, bool) else repr(value)


def _parse(path: Path, text: str) -> dict[str, Any]:
    if path.suffix.lower() in (".yaml", ".yml"):
        try:
            import yaml
        except ImportError:
            raise StudyError(f"study file {path}: YAML needs pyyaml (pip install pyyaml), or write it as TOML") \
                from None
        try:
            raw = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise StudyError(f"study file {path} is not valid YAML: {str(exc).splitlines()[0]}") from None
    else:
        try:
            import tomllib
        except ImportError:  # Python 3.10
            import tomli as tomllib
        try:
            raw = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise StudyError(f"study file {path} is not valid TOML: {exc}") from None
    if not isinstance(raw, dict):
        raise StudyError(f"study file {path}: expected keys and values at the top level")
    return raw


def _relative_to(options: Mapping[str, Any], folder: Path) -> dict[str, Any]:
    """Path options made absolute against the study file's folder (a model only when that folder exists)."""
    out = dict(options)
    for key in PATHS:
        if isinstance(out.get(key), str):
            out[key] = resolve(out[key], folder)
    model = out.get("model")
    if isinstance(model, str) and is_model_folder(model, folder):
        out["model"] = resolve(model, folder)
    return out


__all__ = ["AXES", "SETTINGS", "Kind", "Study", "StudyError", "axis_entry", "expand", "given_keys", "parse_dataset",
           "read_study"]
