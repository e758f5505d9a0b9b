"""The registry contract: names, help, fatal vs. skipped problems, one warning per skip, and `limit`."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
from test_data_formats import pointqa_record, write_image, write_jsonl, write_pointqa

from vheads.data import DataError, Dataset, describe_dataset, list_datasets, load_dataset

LOADERS = ["hf", "jsonl", "mmbench", "pointqa", "pope", "qbench", "refcoco", "seedbench", "shapes"]


def test_every_benchmark_is_registered_with_help() -> None:
    assert list_datasets() == LOADERS
    for name in LOADERS:
        assert len(describe_dataset(name)) > 40


def test_unknown_dataset_lists_the_known_ones() -> None:
    with pytest.raises(DataError, match="unknown dataset 'coco'.*pointqa.*shapes"):
        load_dataset("coco")


@pytest.mark.parametrize("name", [n for n in LOADERS if n != "shapes"])
def test_missing_file_is_fatal_and_names_the_path(tmp_path: Path, name: str) -> None:
    missing = tmp_path / "nowhere.json"
    with pytest.raises(DataError, match="nowhere.json"):
        load_dataset(name, data=missing)


@pytest.mark.parametrize("name", ["jsonl", "mmbench", "pointqa", "pope", "qbench", "refcoco", "seedbench"])
def test_empty_file_is_fatal(tmp_path: Path, name: str) -> None:
    empty = tmp_path / "empty.json"
    empty.write_bytes(b"")
    with pytest.raises(DataError, match=r"empty\.json: empty file"):
        load_dataset(name, data=empty)


def test_file_without_a_valid_record_is_fatal_with_the_reasons(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "q.jsonl", [{"question_id": 1, "image": "gone.png", "text": "Hi?"}])
    with pytest.raises(DataError, match=r"q\.jsonl: no valid record \(1 missing image\)"):
        load_dataset("jsonl", data=path)


def test_each_skip_logs_one_warning_naming_file_and_record(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = write_pointqa(tmp_path)
    with caplog.at_level(logging.WARNING, logger="vheads.data"):
        dataset = load_dataset("pointqa", data=path)
    lines = [r.getMessage() for r in caplog.records if r.name == "vheads.data"]
    assert len(lines) == len(dataset.skipped) == 4
    assert all(str(path) in line and "\n" not in line for line in lines)
    assert "record pointQA_twice-test-2: missing image" in lines[0]
    assert [(s.record, s.reason) for s in dataset.skipped][-1] == ("pointQA_twice-test-5", "missing field")


def test_limit_draws_a_seeded_subset_in_file_order(tmp_path: Path) -> None:
    write_image(tmp_path / "a.png", (50, 50))
    records = [pointqa_record(i, "a.png", [1, 1, 20, 20], str(i % 5 + 1)) for i in range(20)]
    path = tmp_path / "p.json"
    path.write_text(json.dumps(records))
    ids = [s.id for s in load_dataset("pointqa", data=path, limit=5, seed=1)]
    assert len(ids) == 5
    assert ids == sorted(ids, key=lambda i: int(i.rsplit("-", 1)[1]))
    assert ids == [s.id for s in load_dataset("pointqa", data=path, limit=5, seed=1)]
    assert ids != [s.id for s in load_dataset("pointqa", data=path, limit=5, seed=2)]
    assert len(load_dataset("pointqa", data=path, limit=50)) == 20
    assert len(load_dataset("pointqa", data=path, limit=0)) == 0
    with pytest.raises(DataError, match="limit"):
        load_dataset("pointqa", data=path, limit=-1)


def test_limit_replaces_skipped_records_with_good_ones(tmp_path: Path) -> None:
    write_image(tmp_path / "a.png", (50, 50))
    records = [pointqa_record(i, "a.png" if i % 2 else "gone.png", [1, 1, 20, 20]) for i in range(10)]
    path = tmp_path / "p.json"
    path.write_text(json.dumps(records))
    dataset = load_dataset("pointqa", data=path, limit=5)
    assert len(dataset) == 5
    assert all(int(s.id.rsplit("-", 1)[1]) % 2 for s in dataset)


def test_repeated_ids_are_skipped(tmp_path: Path) -> None:
    write_image(tmp_path / "a.png")
    line = {"question_id": 1, "image": "a.png", "text": "Is it?", "label": "yes"}
    dataset = load_dataset("jsonl", data=write_jsonl(tmp_path / "q.jsonl", [line, line]))
    assert len(dataset) == 1
    assert dataset.skip_summary() == {"duplicate id": 1}


def test_dataset_behaves_like_a_list_of_samples(tmp_path: Path) -> None:
    dataset = load_dataset("shapes", limit=4, split="train")
    assert isinstance(dataset, Dataset)
    assert (dataset.name, dataset.split, len(dataset), dataset.skipped) == ("shapes", "train", 4, [])
    assert [s.id for s in dataset] == [dataset[i].id for i in range(4)]
    assert len(load_dataset("shapes")) == 1000


def test_a_file_with_no_records_or_no_match_is_fatal(tmp_path: Path) -> None:
    empty_list = tmp_path / "none.json"
    empty_list.write_text("[]")
    with pytest.raises(DataError, match=r"none\.json: no records$"):
        load_dataset("pointqa", data=empty_list)
    write_image(tmp_path / "a.jpg")
    path = write_jsonl(tmp_path / "pope.jsonl", [{"question_id": 1, "image": "a.jpg", "text": "Cat?", "label": "yes",
                                                  "category": "random"}])
    with pytest.raises(DataError, match="no record matches split=popular"):
        load_dataset("pope", data=path, split="popular")
    with pytest.raises(DataError, match="seed"):
        load_dataset("pope", data=path, seed=-1, limit=1)


def test_the_run_help_lists_every_registered_loader() -> None:
    from typer.testing import CliRunner

    from vheads.cli import app

    text = " ".join(CliRunner().invoke(app, ["run", "--help"], terminal_width=200).output.split())
    assert all(name in text for name in list_datasets()), text
