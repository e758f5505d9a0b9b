"""Fuzzing every loader: random bytes, truncated files and mangled records never raise anything but DataError."""

from __future__ import annotations

import json
import shutil
import uuid
from contextlib import suppress
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_data_formats import (
    write_hf,
    write_llava_jsonl,
    write_mmbench,
    write_pointqa,
    write_pope,
    write_qbench,
    write_refcoco,
    write_seed,
    write_shikra,
)

from vheads.data import BadSample, DataError, load_dataset, write_shapes

FUZZ = settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
WRITERS = {
    "pointqa": write_pointqa,
    "shikra": write_shikra,
    "pope": write_pope,
    "mmbench": write_mmbench,
    "seedbench": write_seed,
    "qbench": write_qbench,
    "jsonl": write_llava_jsonl,
    "refcoco": write_refcoco,
    "shapes": lambda folder: write_shapes(folder, 3, seed=1),
}
LOADER_OF = {"shikra": "pointqa"}
JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)


@pytest.fixture(scope="module")
def valid_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One valid file per format, each in its own folder with its images."""
    return {fmt: write(tmp_path_factory.mktemp(fmt)) for fmt, write in WRITERS.items()}


def loads_or_refuses(name: str, path: Path) -> None:
    """Load `path`; only DataError may escape, and every loaded image opens or raises BadSample."""
    try:
        dataset = load_dataset(name, data=path)
    except DataError:
        return
    for sample in dataset:
        assert isinstance(sample.text, str) and sample.text
        try:
            sample.image()
        except BadSample:
            pass


def fuzz_file(valid: Path, content: bytes) -> Path:
    """A fresh file beside `valid` (so its images resolve) holding `content`."""
    path = valid.with_name(f"fuzz-{uuid.uuid4().hex}{valid.suffix}")
    path.write_bytes(content)
    return path


@pytest.mark.parametrize("fmt", list(WRITERS))
@FUZZ
@given(content=st.binary(max_size=600))
def test_random_bytes(valid_files: dict[str, Path], fmt: str, content: bytes) -> None:
    loads_or_refuses(LOADER_OF.get(fmt, fmt), fuzz_file(valid_files[fmt], content))


@pytest.mark.parametrize("fmt", list(WRITERS))
@FUZZ
@given(cut=st.floats(0, 1), junk=st.binary(max_size=8))
def test_truncated_file(valid_files: dict[str, Path], fmt: str, cut: float, junk: bytes) -> None:
    original = valid_files[fmt].read_bytes()
    loads_or_refuses(LOADER_OF.get(fmt, fmt), fuzz_file(valid_files[fmt], original[: int(len(original) * cut)] + junk))


def records_of(fmt: str, path: Path) -> list[dict[str, Any]]:
    """The valid records of a format, as dicts."""
    if fmt in ("pope", "shikra", "jsonl", "refcoco"):
        records = []
        for line in path.read_text().splitlines():
            with suppress(json.JSONDecodeError):
                records.append(json.loads(line))
        return records
    document = json.loads(path.read_text())
    return document["questions"] if fmt == "seedbench" else document


def serialise(fmt: str, path: Path, records: list[Any]) -> bytes:
    """Records back into the format's file layout."""
    if fmt in ("pope", "shikra", "jsonl", "refcoco"):
        return "".join(json.dumps(r) + "\n" for r in records).encode()
    if fmt == "seedbench":
        return json.dumps({"questions": records}).encode()
    return json.dumps(records).encode()


@pytest.mark.parametrize("fmt", [f for f in WRITERS if f != "mmbench"])
@FUZZ
@given(data=st.data())
def test_mangled_records(valid_files: dict[str, Path], fmt: str, data: st.DataObject) -> None:
    records = records_of(fmt, valid_files[fmt])
    mangled: list[Any] = []
    for record in records:
        record = dict(record)
        for key in data.draw(st.lists(st.sampled_from(sorted(record)), max_size=3, unique=True)):
            if data.draw(st.booleans()):
                del record[key]
            else:
                record[key] = data.draw(JSON)
        mangled.append(record)
    mangled += data.draw(st.lists(JSON, max_size=2))
    path = fuzz_file(valid_files[fmt], serialise(fmt, valid_files[fmt], mangled))
    loads_or_refuses(LOADER_OF.get(fmt, fmt), path)


@FUZZ
@given(data=st.data())
def test_mangled_mmbench_cells(valid_files: dict[str, Path], data: st.DataObject) -> None:
    import pandas as pd

    frame = pd.read_table(valid_files["mmbench"], dtype=str)
    for _ in range(data.draw(st.integers(1, 6))):
        row = data.draw(st.integers(0, len(frame) - 1))
        column = data.draw(st.sampled_from(list(frame.columns)))
        frame.loc[row, column] = data.draw(st.none() | st.text(max_size=20) | st.sampled_from(["nan", "7", "-1"]))
    columns = data.draw(st.lists(st.sampled_from(list(frame.columns)), min_size=1, unique=True))
    path = valid_files["mmbench"].with_name(f"fuzz-{uuid.uuid4().hex}.tsv")
    frame[columns].to_csv(path, sep="\t", index=False)
    loads_or_refuses("mmbench", path)


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A valid datasets folder to corrupt."""
    return write_hf(tmp_path_factory.mktemp("hf"))


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_corrupted_hf_folder(hf_folder: Path, tmp_path_factory: pytest.TempPathFactory, data: st.DataObject) -> None:
    copy = tmp_path_factory.mktemp("hf-fuzz") / "saved"
    shutil.copytree(hf_folder, copy)
    victim = data.draw(st.sampled_from(sorted(p for p in copy.iterdir() if p.is_file())))
    original = victim.read_bytes()
    if data.draw(st.booleans()):
        victim.write_bytes(original[: data.draw(st.integers(0, len(original)))])
    else:
        victim.write_bytes(data.draw(st.binary(max_size=400)))
    try:
        dataset = load_dataset("hf", data=copy, columns={"question": "prompt"})
    except DataError:
        return
    for sample in dataset:
        try:
            sample.image()
        except BadSample:
            pass
