"""Each benchmark format written the way the real files are (a few records, PIL-drawn images), read back.

The `write_*` helpers here are also used by the fuzz tests as valid starting points.
"""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path

import pytest
from PIL import Image, ImageDraw

from vheads.data import BadSample, DataError, load_dataset
from vheads.data.prompts import LETTER_ANSWER, SHORT_ANSWER

SHORT = "\n" + SHORT_ANSWER


def png_bytes(size: tuple[int, int] = (80, 60), color: str = "navy") -> bytes:
    """A small PNG with a filled square, as bytes."""
    image = Image.new("RGB", size, "white")
    ImageDraw.Draw(image).rectangle([10, 10, 30, 30], fill=color)
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


def write_image(path: Path, size: tuple[int, int] = (80, 60), color: str = "navy") -> str:
    """Write a PNG at `path` and return its file name."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(png_bytes(size, color))
    return path.name


def write_jsonl(path: Path, records: list) -> Path:
    """One JSON value per line."""
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def pointqa_record(i: int, image: str, box: list[float], answer: str = "2") -> dict:
    """A ViP-LLaVA pointQA_twice record."""
    return {"id": f"pointQA_twice-test-{i}", "image": image, "bboxes": [box],
            "general_question": "How many of these are there?", "obj_question": "How many cups are there?",
            "super_question": "How many of these objects are there?", "answer": answer}


def write_pointqa(folder: Path) -> Path:
    """Two good ViP-LLaVA records, then: missing image, corrupt image, box outside, missing question."""
    write_image(folder / "vg" / "1.png")
    write_image(folder / "vg" / "2.png", (100, 100))
    (folder / "vg" / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    general_missing = pointqa_record(5, "vg/1.png", [1, 1, 5, 5])
    del general_missing["general_question"]
    records = [
        pointqa_record(0, "vg/1.png", [8, 6, 40, 30], "2"),
        pointqa_record(1, "vg/2.png", [0, 0, 50, 100], "3"),
        pointqa_record(2, "vg/absent.png", [1, 1, 5, 5]),
        pointqa_record(3, "vg/bad.png", [1, 1, 5, 5]),
        pointqa_record(4, "vg/1.png", [10, 10, 200, 50]),
        general_missing,
    ]
    path = folder / "pointQA_twice_test.json"
    path.write_text(json.dumps(records), encoding="utf-8")
    return path


def write_shikra(folder: Path) -> Path:
    """Shikra's pointQA JSON lines: two good records and one line that is not JSON."""
    write_image(folder / "VG_100K" / "7.png", (120, 90))
    line = {"file_path": "VG_100K/7.png", "obj_question": "How many dogs are there?",
            "super_question": "How many of these animals are there?",
            "general_question": "How many of these are there?", "answer": "4",
            "bbox": [12, 9, 60, 45], "point": [36, 27]}
    path = write_jsonl(folder / "pointQA_twice_test.jsonl", [line, {**line, "answer": "1"}])
    with path.open("a", encoding="utf-8") as handle:
        handle.write('{"file_path": "VG_100K/7.png", "answer": \n')
    return path


def write_pope(folder: Path) -> Path:
    """LLaVA's POPE question file with `category`, one bad label and one record without image."""
    write_image(folder / "val2014" / "COCO_val2014_000000000042.jpg")
    image = "COCO_val2014_000000000042.jpg"
    records = [
        {"question_id": 1, "image": image, "text": "Is there a kite in the image?", "label": "no",
         "category": "random"},
        {"question_id": 2, "image": image, "text": "Is there a cup in the image?" + SHORT, "label": "Yes",
         "category": "random"},
        {"question_id": 1, "image": image, "text": "Is there a dog in the image?", "label": "yes",
         "category": "popular"},
        {"question_id": 3, "image": image, "text": "Is there a car in the image?", "label": "maybe",
         "category": "random"},
        {"question_id": 4, "text": "Is there a bus in the image?", "label": "no", "category": "adversarial"},
    ]
    return write_jsonl(folder / "llava_pope_test.jsonl", records)


def mmbench_row(index: int, question: str, options: list[str | None], answer: str, image: str,
                hint: str | None = None, category: str = "object_localization") -> dict:
    """One MMBench TSV row as a dict (None becomes an empty cell)."""
    a, b, c, d = (options + [None] * 4)[:4]
    return {"index": index, "question": question, "hint": hint, "A": a, "B": b, "C": c, "D": d,
            "answer": answer, "category": category, "image": image, "source": "src",
            "l2-category": "finegrained_perception (instance-level)", "comment": None, "split": "dev"}


def write_mmbench(folder: Path, name: str = "mmbench_dev_20230712.tsv") -> Path:
    """A TSV: a 3-option question with hint, its circular copy, a 4-option one, a bad-base64 row, a 1-option row."""
    import pandas as pd

    image = base64.b64encode(png_bytes()).decode()
    rows = [
        mmbench_row(7, "What is shown?", ["cat", "dog", "bird"], "B", image, hint="A pet photo."),
        mmbench_row(1_000_007, "What is shown?", ["dog", "bird", "cat"], "A", image, hint="A pet photo."),
        mmbench_row(8, "Which colour?", ["red", "green", "blue", "navy"], "D", image, category="color"),
        mmbench_row(9, "Broken image?", ["yes", "no"], "A", "%%%not-base64%%%"),
        mmbench_row(10, "One option?", ["only"], "A", image),
    ]
    path = folder / name
    pd.DataFrame(rows).to_csv(path, sep="\t", index=False)
    return path


def write_seed(folder: Path) -> Path:
    """SEED-Bench.json with two image questions, a video one, a dimension-10 one and a bad answer."""
    write_image(folder / "SEED-Bench-image" / "0001_0002.png")
    base = {"choice_a": "Red", "choice_b": "Blue", "choice_c": "Green", "choice_d": "White",
            "data_id": "0001_0002.png", "data_type": "image"}
    questions = [
        {**base, "question_id": "555", "question": "What color is the car?", "answer": "B", "question_type_id": 3},
        {**base, "question_id": "556", "question": "How many cars?", "answer": "A", "question_type_id": 5},
        {**base, "question_id": "v1", "question": "What happens?", "answer": "A", "question_type_id": 10,
         "data_type": "video", "data_id": "clip.mp4"},
        {**base, "question_id": "557", "question": "Skipped dimension?", "answer": "A", "question_type_id": 11},
        {**base, "question_id": "558", "question": "Bad answer?", "answer": "E", "question_type_id": 3},
    ]
    document = {"questions": questions, "question_type": {"Instance Attributes": 3, "Instances Counting": 5}}
    path = folder / "SEED-Bench.json"
    path.write_text(json.dumps(document), encoding="utf-8")
    return path


def write_qbench(folder: Path) -> Path:
    """A Q-Bench A1 list: a yes/no and a what question, and one whose correct_ans is not a candidate."""
    write_image(folder / "images" / "img_0042.png")
    records = [
        {"img_path": "img_0042.png", "question": "Is the image blurry?", "candidates": ["Yes", "No"],
         "correct_ans": "No", "type": 0, "concern": 0},
        {"img_path": "img_0042.png", "question": "What is the main distortion?",
         "candidates": ["Noise", "Blur", "Overexposure"], "correct_ans": "Noise", "type": 2, "concern": 2},
        {"img_path": "img_0042.png", "question": "Is it dark?", "candidates": ["Yes", "No"],
         "correct_ans": "Maybe", "type": 0, "concern": 1},
    ]
    path = folder / "llvisionqa_dev.json"
    path.write_text(json.dumps(records), encoding="utf-8")
    return path


def write_llava_jsonl(folder: Path) -> Path:
    """A generic LLaVA question file with answers of every scoring kind."""
    write_image(folder / "imgs" / "0001.png")
    mc = "Which animal?\nA. cat\nB. dog\n" + LETTER_ANSWER
    records = [
        {"question_id": 12, "image": "imgs/0001.png", "text": "Is the cup red?" + SHORT, "category": "color",
         "label": "No"},
        {"question_id": 13, "image": "imgs/0001.png", "text": mc, "category": "animal", "answer": "dog"},
        {"question_id": 14, "image": "imgs/0001.png", "text": "How many cups?" + SHORT, "gt": "3"},
        {"question_id": 15, "image": "imgs/0001.png", "text": "What is the cup made of?" + SHORT},
    ]
    return write_jsonl(folder / "questions.jsonl", records)


def write_hf(folder: Path) -> Path:
    """A datasets folder (save_to_disk) with an Image column, one path-only row set aside by the caller."""
    import datasets

    images = [Image.open(io.BytesIO(png_bytes(color=c))) for c in ("red", "green")]
    table = datasets.Dataset.from_dict(
        {"prompt": ["Is it red?", "Which colour?"], "answer": ["yes", "green"], "image": images,
         "options": [None, ["red", "green"]], "id": ["r1", "r2"]},
        features=datasets.Features({"prompt": datasets.Value("string"), "answer": datasets.Value("string"),
                                    "image": datasets.Image(), "options": datasets.Sequence(datasets.Value("string")),
                                    "id": datasets.Value("string")}),
    )
    target = folder / "hf_saved"
    table.save_to_disk(str(target))
    return target


def write_refcoco(folder: Path) -> Path:
    """RefCOCO in lmms-eval's layout (COCO [x, y, w, h] boxes, a list of expressions) beside hand-made corner-box
    lines, then: a missing image, a box outside the image, a record with no expression, a line that is not JSON."""
    write_image(folder / "coco" / "a.png", (80, 60))
    write_image(folder / "coco" / "b.png", (40, 40))
    records = [
        {"question_id": "r1", "file_name": "coco/a.png", "bbox": [10, 5, 20, 30], "split": "testA",
         "answer": ["the left cup", "cup on the left"], "question": "Describe the region."},
        {"id": 7, "image": "coco/b.png", "box": [4, 4, 36, 20], "expression": "the top half", "split": "val"},
        {"id": 8, "image": "coco/gone.png", "bbox": [1, 1, 5, 5], "sentence": "nothing", "split": "val"},
        {"id": 9, "image": "coco/b.png", "bbox": [30, 30, 20, 20], "sentence": "too far", "split": "val"},
        {"id": 10, "image": "coco/a.png", "bbox": [1, 1, 5, 5], "split": "val"},
    ]
    path = write_jsonl(folder / "refcoco.jsonl", records)
    with path.open("a", encoding="utf-8") as handle:
        handle.write("{not json\n")
    return path


def has_red_box(image: Image.Image, box: tuple[float, float, float, float]) -> bool:
    """True if the pixel on the box's top edge is the half-transparent red over white."""
    r, g, b = image.getpixel((int((box[0] + box[2]) / 2), int(box[1])))
    return r > 200 and g < 150 and b < 150


def test_pointqa_vip_layout_visual_prompt(tmp_path: Path) -> None:
    dataset = load_dataset("pointqa", data=write_pointqa(tmp_path))
    assert [s.id for s in dataset] == ["pointQA_twice-test-0", "pointQA_twice-test-1"]
    first = dataset[0]
    assert first.text == ("How many of these are there? The exemplary object is within the rectangle.\n"
                          "Answer the question using a single word or phrase.")
    assert (first.answer, first.question_type, first.prompt_style, first.scoring) == ("2", "general", "visual", "count")
    assert first.box == (8.0, 6.0, 40.0, 30.0)
    assert has_red_box(first.image(), first.box)
    assert dataset.skip_summary() == {"missing image": 1, "corrupt image": 1, "box outside image": 1,
                                      "missing field": 1}


def test_pointqa_plain_and_none_styles_and_question_types(tmp_path: Path) -> None:
    path = write_pointqa(tmp_path)
    plain = load_dataset("pointqa", data=path, question_type="object", prompt_style="plain")
    assert plain[0].text == ("How many cups are there? The exemplary object is at [0.10, 0.10, 0.50, 0.50].\n"
                             "Answer the question using a single word or phrase.")
    assert plain[0].question_type == "obj"
    assert not has_red_box(plain[0].image(), plain[0].box)
    bare = load_dataset("pointqa", data=path, question_type="super", prompt_style="none")
    assert bare[1].text == "How many of these objects are there?\nAnswer the question using a single word or phrase."
    assert bare[1].box == (0.0, 0.0, 50.0, 100.0)
    with pytest.raises(DataError, match="question type"):
        load_dataset("pointqa", data=path, question_type="colour")
    with pytest.raises(DataError, match="prompt style"):
        load_dataset("pointqa", data=path, prompt_style="arrow")


def test_pointqa_shikra_layout(tmp_path: Path) -> None:
    dataset = load_dataset("pointqa", data=write_shikra(tmp_path), question_type="obj")
    assert [(s.id, s.answer, s.question) for s in dataset] == [
        ("L1", "4", "How many dogs are there?"), ("L2", "1", "How many dogs are there?")]
    assert dataset[0].box == (12.0, 9.0, 60.0, 45.0)
    assert dataset[0].meta["layout"] == "shikra"
    assert dataset.skip_summary() == {"bad JSON": 1}


def test_pope_filters_category_and_adds_suffix_once(tmp_path: Path) -> None:
    path = write_pope(tmp_path)
    random = load_dataset("pope", data=path, images=tmp_path / "val2014", split="random")
    assert random.split == "random"
    assert [s.id for s in random] == ["random-1", "random-2"]
    assert [s.answer for s in random] == ["no", "yes"]
    assert random[0].text == "Is there a kite in the image?" + SHORT
    assert random[1].text == "Is there a cup in the image?" + SHORT
    assert random[1].question == "Is there a cup in the image?"
    assert random.skip_summary() == {"bad field": 1}
    everything = load_dataset("pope", data=path, images=tmp_path / "val2014")
    assert {s.question_type for s in everything} == {"random", "popular"}
    assert everything.skip_summary() == {"bad field": 1, "missing field": 1}


def test_one_byte_that_is_not_utf8_skips_its_record_only_naming_the_line(tmp_path: Path) -> None:
    path = write_pope(tmp_path)
    latin1 = b'{"question_id": 9, "image": "COCO_val2014_000000000042.jpg", "text": "Is there a caf\xe9?"}\n'
    with path.open("ab") as handle:
        handle.write(latin1)
    dataset = load_dataset("pope", data=path, images=tmp_path / "val2014", split="random")
    assert [s.id for s in dataset] == ["random-1", "random-2"]
    assert dataset.skip_summary() == {"bad field": 1, "bad JSON": 1}
    [bad] = [skip for skip in dataset.skipped if skip.reason == "bad JSON"]
    column = latin1.index(b"\xe9") + 1
    assert bad.line() == f"skipped {path} record line 6: bad JSON (not UTF-8: byte 0xe9 at column {column})"


def test_pope_per_split_file_is_its_split(tmp_path: Path) -> None:
    write_image(tmp_path / "a.jpg")
    path = write_jsonl(tmp_path / "coco_pope_adversarial.json",
                       [{"question_id": 1, "image": "a.jpg", "text": "Is there a cat?", "label": "yes"}])
    dataset = load_dataset("pope", data=path)
    assert dataset.split == "adversarial"
    assert dataset[0].question_type == "adversarial"
    assert dataset[0].scoring == "yesno"


def test_mmbench_prompt_options_and_circular_groups(tmp_path: Path) -> None:
    dataset = load_dataset("mmbench", data=write_mmbench(tmp_path))
    assert [s.id for s in dataset] == ["7", "1000007", "8"]
    first = dataset[0]
    assert first.text == ("A pet photo.\nWhat is shown?\nA. cat\nB. dog\nC. bird\n"
                          "Answer with the option's letter from the given choices directly.")
    assert first.options == ["cat", "dog", "bird"]
    assert (first.answer, first.scoring, first.question_type) == ("B", "letter", "object_localization")
    assert dataset[1].meta["circular_group"] == first.meta["circular_group"] == "7"
    assert dataset[2].text.startswith("Which colour?\nA. red")
    assert first.image().size == (80, 60)
    assert dataset.skip_summary() == {"bad base64": 1, "bad field": 1}


def test_mmbench_limit_keeps_circular_copies_together(tmp_path: Path) -> None:
    path = write_mmbench(tmp_path)
    for seed in range(6):
        ids = [s.id for s in load_dataset("mmbench", data=path, limit=1, seed=seed)]
        assert ids in (["7", "1000007"], ["8"])


def test_mmbench_chinese_file_and_shared_image_reference(tmp_path: Path) -> None:
    import pandas as pd

    image = base64.b64encode(png_bytes()).decode()
    rows = [mmbench_row(3, "是什么?", ["猫", "狗"], "A", image),
            mmbench_row(1_000_003, "是什么?", ["狗", "猫"], "B", "3")]
    path = tmp_path / "mmbench_dev_cn_20231003.tsv"
    pd.DataFrame(rows).to_csv(path, sep="\t", index=False)
    dataset = load_dataset("mmbench", data=path)
    assert dataset[0].text.endswith("\n请直接回答选项字母。")
    assert dataset[1].image().size == (80, 60)


def test_seedbench_keeps_image_dimensions_only(tmp_path: Path) -> None:
    dataset = load_dataset("seedbench", data=write_seed(tmp_path))
    assert [s.id for s in dataset] == ["555", "556"]
    assert dataset[0].text == ("What color is the car?\nA. Red\nB. Blue\nC. Green\nD. White\n"
                               "Answer with the option's letter from the given choices directly.")
    assert (dataset[0].question_type, dataset[0].answer) == ("Instance Attributes", "B")
    assert dataset.skip_summary() == {"bad field": 1}
    counting = load_dataset("seedbench", data=write_seed(tmp_path), question_type="instances counting")
    assert [s.id for s in counting] == ["556"]
    assert [s.id for s in load_dataset("seedbench", data=tmp_path / "SEED-Bench.json", question_type="3")] == ["555"]


def test_qbench_turns_correct_text_into_letter(tmp_path: Path) -> None:
    dataset = load_dataset("qbench", data=write_qbench(tmp_path), images=tmp_path / "images")
    assert [(s.answer, s.question_type, s.meta["concern"]) for s in dataset] == [
        ("B", "yes-or-no", "global distortion"), ("A", "what", "local distortion")]
    assert dataset[0].text == "Is the image blurry?\nChoose between one of the options as follows:\nA. Yes\nB. No\n"
    assert dataset.skip_summary() == {"bad field": 1}
    only_what = load_dataset("qbench", data=tmp_path / "llvisionqa_dev.json", images=tmp_path / "images",
                             question_type="what")
    assert [s.answer for s in only_what] == ["A"]


def test_jsonl_picks_scoring_from_the_answer(tmp_path: Path) -> None:
    dataset = load_dataset("jsonl", data=write_llava_jsonl(tmp_path))
    assert [(s.id, s.answer, s.scoring) for s in dataset] == [
        ("12", "No", "yesno"), ("13", "B", "letter"), ("14", "3", "count"), ("15", None, "exact")]
    assert dataset[1].options == ["cat", "dog"]
    assert dataset[0].text == "Is the cup red?" + SHORT
    assert dataset[0].question_type == "color"


def test_jsonl_answers_from_a_separate_file(tmp_path: Path) -> None:
    questions = write_llava_jsonl(tmp_path)
    answers = write_jsonl(tmp_path / "answers.jsonl", [{"question_id": 15, "answer": "Glass"}, "junk"])
    dataset = load_dataset("jsonl", data=questions, answers=answers)
    assert dataset[3].answer == "Glass"
    with pytest.raises(DataError, match="does not take"):
        load_dataset("jsonl", data=questions, columns={})


def test_hf_folder_with_column_mapping(tmp_path: Path) -> None:
    folder = write_hf(tmp_path)
    dataset = load_dataset("hf", data=folder, columns={"question": "prompt"})
    assert [(s.id, s.text, s.answer, s.scoring) for s in dataset] == [
        ("r1", "Is it red?", "yes", "yesno"),
        ("r2", "Which colour?\nA. red\nB. green\n" + LETTER_ANSWER, "B", "letter"),
    ]
    assert dataset[0].image().getpixel((20, 20)) == (255, 0, 0)
    with pytest.raises(DataError, match="missing column"):
        load_dataset("hf", data=folder)


def test_hf_image_paths_and_dataset_dict_splits(tmp_path: Path) -> None:
    import datasets

    write_image(tmp_path / "pics" / "a.png")
    table = datasets.Dataset.from_dict({"question": ["Is it?", "Broken?"], "image": ["a.png", "none.png"],
                                        "answer": ["no", "yes"]})
    datasets.DatasetDict({"train": table, "validation": table}).save_to_disk(str(tmp_path / "dd"))
    with pytest.raises(DataError, match="choose a split"):
        load_dataset("hf", data=tmp_path / "dd", images=tmp_path / "pics")
    dataset = load_dataset("hf", data=tmp_path / "dd", images=tmp_path / "pics", split="validation")
    assert dataset.split == "validation"
    assert [s.id for s in dataset] == ["0"]
    assert dataset.skip_summary() == {"missing image": 1}


def test_refcoco_reads_lmms_eval_and_corner_boxes_one_sample_per_expression(tmp_path: Path) -> None:
    dataset = load_dataset("refcoco", data=write_refcoco(tmp_path))
    assert [s.id for s in dataset] == ["r1:0", "r1:1", "7"]
    first, second, third = dataset
    assert (first.question, first.text, second.text) == ("the left cup", "the left cup", "cup on the left")
    assert first.box == (10.0, 5.0, 30.0, 35.0) and third.box == (4.0, 4.0, 36.0, 20.0)
    assert first.answer is None and first.prompt_style == "none" and first.targets() == [first.box]
    assert first.image().size == (80, 60) and not has_red_box(first.image(), first.box)
    assert dataset.skip_summary() == {"missing image": 1, "box outside image": 1, "missing field": 1, "bad JSON": 1}


def test_refcoco_split_and_prompt_style(tmp_path: Path) -> None:
    path = write_refcoco(tmp_path)
    assert [s.id for s in load_dataset("refcoco", data=path, split="testA")] == ["r1:0", "r1:1"]
    with pytest.raises(DataError, match="--prompt-style none only"):
        load_dataset("refcoco", data=path, prompt_style="visual")


def test_refcoco_refer_api_sentences_and_bad_boxes(tmp_path: Path) -> None:
    write_image(tmp_path / "c.png", (50, 50))
    records = [{"ref_id": 1, "image": "c.png", "bbox": [0, 0, 10, 10], "sentences": [{"sent": "a"}, {"raw": "b"}]},
               {"ref_id": 2, "image": "c.png", "bbox": [0, 0, -3, 10], "sent": "negative width"},
               {"ref_id": 3, "image": "c.png", "bbox": [0, 0, "x", 10], "sent": "text in the box"},
               {"ref_id": 4, "image": "c.png", "bbox": [0, 0, 10 ** 400, 10], "sent": "too large"},
               {"ref_id": 5, "image": "c.png", "box": [5, 5], "sent": "two numbers"}]
    dataset = load_dataset("refcoco", data=write_jsonl(tmp_path / "refs.jsonl", records))
    assert [(s.id, s.text) for s in dataset] == [("1:0", "a"), ("1:1", "b")]
    assert [(s.record, s.reason) for s in dataset.skipped] == [("2", "bad field"), ("3", "bad field"),
                                                              ("4", "bad field"), ("5", "bad field")]


def test_image_that_vanishes_after_loading_raises_bad_sample(tmp_path: Path) -> None:
    dataset = load_dataset("pointqa", data=write_pointqa(tmp_path))
    (tmp_path / "vg" / "1.png").write_bytes(b"\x89PNG\r\n\x1a\ntruncated")
    with pytest.raises(BadSample, match="corrupt image"):
        dataset[0].image()
    (tmp_path / "vg" / "2.png").unlink()
    with pytest.raises(BadSample, match="missing image"):
        dataset[1].image()


def test_samples_pickle_for_worker_processes(tmp_path: Path) -> None:
    import pickle

    loaded = [
        load_dataset("pointqa", data=write_pointqa(tmp_path / "p"))[0],
        load_dataset("mmbench", data=write_mmbench(tmp_path))[0],
        load_dataset("hf", data=write_hf(tmp_path), columns={"question": "prompt"})[0],
        load_dataset("shapes", limit=1)[0],
    ]
    for sample in loaded:
        copy = pickle.loads(pickle.dumps(sample))
        assert copy.text == sample.text
        assert copy.image().tobytes() == sample.image().tobytes()
