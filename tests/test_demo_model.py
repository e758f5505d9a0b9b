"""The embedded demo model: its build, a short training, saving and reloading, and the shipped weights."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForImageTextToText, AutoProcessor

from vheads.analysis.ranking import head_table
from vheads.analysis.selectors import resolve_heads
from vheads.data.shapes import COLORS, SHAPES, scene_for
from vheads.demo.build import IMAGE, IMAGE_SIZE, PATCH_SIZE, build_demo
from vheads.demo.train import (
    HeadDropout,
    curriculum,
    encode_train,
    evaluate,
    held_out,
    predict,
    probe_targets,
    prompt_for,
    train_batch,
    train_demo,
)
from vheads.models.loading import DEMO_DIR
from vheads.pipeline.config import RunConfig
from vheads.pipeline.run import run
from vheads.store import Store


def _load(folder: Path) -> tuple:
    """The generic loader's two calls: (processor, model)."""
    processor = AutoProcessor.from_pretrained(folder)
    return processor, AutoModelForImageTextToText.from_pretrained(folder, use_safetensors=True)


@contextmanager
def one_thread() -> Iterator[None]:
    """Run torch on one thread (small matrices; a busy shared machine makes more threads far slower)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """A tiny model trained for a few hundred steps."""
    out = tmp_path_factory.mktemp("demo")
    with one_thread():
        metrics = train_demo(
            out, steps=200, seed=0, batch_size=8, tiny=True, eval_every=100, eval_samples=24,
            final_eval_samples=24, log=lambda _: None,
        )
    return out, metrics


def test_tokenizer_splits_words_and_punctuation() -> None:
    _, processor = build_demo(0, tiny=True)
    tok = processor.tokenizer
    assert tok.tokenize("How many are there?") == ["how", "many", "are", "there", "?"]
    assert tok.tokenize("[0.25, 1.00]")[:5] == ["[", "0", ".", "2", "5"]
    assert tok.padding_side == "left"
    three = tok("3", add_special_tokens=False)["input_ids"]
    assert tok.decode(three + [tok.eos_token_id], skip_special_tokens=True) == "3"
    assert tok.unk_token_id not in tok(held_out(3)[0].text)["input_ids"]


def test_image_tokens_match_image_features() -> None:
    model, processor = build_demo(0, tiny=True)
    sample = held_out(1)[0]
    inputs = processor(images=[sample.image()], text=[prompt_for(processor, sample)], return_tensors="pt")
    assert model.config.image_token_id == processor.tokenizer.convert_tokens_to_ids(IMAGE)
    n_tokens = int((inputs["input_ids"] == model.config.image_token_id).sum())
    with torch.no_grad():
        features = model.get_image_features(pixel_values=inputs["pixel_values"]).pooler_output
    n_features = sum(f.shape[0] for f in features) if isinstance(features, (list, tuple)) else features.shape[-2]
    assert n_tokens == n_features == model.config.image_seq_length


def test_training_rows_match_inference_prompt() -> None:
    _, processor = build_demo(0, tiny=True)
    samples = train_batch(3, 6, seed=0, stage=curriculum(4))
    batch = encode_train(processor, samples)
    for i, sample in enumerate(samples):
        text = [prompt_for(processor, sample)]
        ids = processor(images=[sample.image()], text=text, return_tensors="pt")["input_ids"][0]
        assert torch.equal(batch["input_ids"][i, : len(ids)], ids)
        answer = batch["labels"][i][batch["labels"][i] != -100].tolist()
        assert answer == [processor.tokenizer.convert_tokens_to_ids(sample.answer), processor.tokenizer.eos_token_id]
    assert all(batch["attention_mask"][:, 0] == 1)


def test_train_batches_are_deterministic_and_train_split() -> None:
    first, again = train_batch(5, 4, 0, curriculum(2)), train_batch(5, 4, 0, curriculum(2))
    assert [s.id for s in first] == [s.id for s in again]
    assert [s.text for s in first] == [s.text for s in again]
    assert all("-train-" in s.id for s in first)


def test_probe_targets_follow_the_scene() -> None:
    stage = curriculum(4)
    samples = train_batch(2, 8, seed=0, stage=stage)
    grid = IMAGE_SIZE // PATCH_SIZE
    targets = probe_targets(samples, stage, grid=grid)
    colors, shapes = list(COLORS), list(SHAPES)
    for row, sample in enumerate(samples):
        scene = scene_for(sample.meta["index"], 0, "train", max_count=stage.max_count)
        patch = scene.image_size / grid
        centred = {int(t.cy // patch) * grid + int(t.cx // patch):
                   1 + colors.index(t.color) * len(shapes) + shapes.index(t.shape) for t in scene.things}
        assert len(centred) == len(scene.things)
        assert targets["cell_class"][row].tolist() == [centred.get(cell, 0) for cell in range(grid * grid)]
        patches = [(c * patch, r * patch, (c + 1) * patch, (r + 1) * patch) for r in range(grid) for c in range(grid)]
        x1, y1, x2, y2 = sample.box
        boxed = [int(a < x2 and c > x1 and b < y2 and d > y1) for a, b, c, d in patches]
        expected = boxed if sample.prompt_style == "visual" else [0] * len(patches)
        assert targets["cell_boxed"][row].tolist() == expected
    assert targets["known"].tolist() == [s.question_type == "obj" or s.prompt_style == "visual" for s in samples]


def test_head_dropout_zeroes_whole_heads_in_training_only() -> None:
    model, processor = build_demo(0, tiny=True)
    sample = held_out(1)[0]
    inputs = processor(images=[sample.image()] * 4, text=[prompt_for(processor, sample)] * 4, return_tensors="pt")
    o_proj = model.model.language_model.layers[0].self_attn.o_proj
    seen: list[torch.Tensor] = []
    o_proj.register_forward_hook(lambda _m, args, _out: seen.append(args[0].detach()))
    with torch.no_grad():
        model.eval()
        plain = model(**inputs).logits
        dropout = HeadDropout(model, 0.5)
        assert torch.equal(model(**inputs).logits, plain)
        model.train()
        torch.manual_seed(0)
        model(**inputs)
        dropout.remove()
        assert torch.equal(model(**inputs).logits, model(**inputs).logits)
    clean, dropped = seen[0].unflatten(-1, (2, -1)), seen[2].unflatten(-1, (2, -1))
    zeroed = (dropped == 0).all(dim=(1, 3))
    assert zeroed.any() and not zeroed.all()
    kept = ~zeroed
    assert torch.allclose(dropped.transpose(1, 2)[kept], 2 * clean.transpose(1, 2)[kept], atol=1e-5)


def test_same_seed_same_model(tmp_path: Path) -> None:
    kwargs = dict(steps=12, seed=3, batch_size=4, tiny=True, eval_every=100, eval_samples=4, final_eval_samples=4)
    with one_thread():
        train_demo(tmp_path / "a", log=lambda _: None, **kwargs)
        train_demo(tmp_path / "b", log=lambda _: None, **kwargs)
    assert (tmp_path / "a" / "model.safetensors").read_bytes() == (tmp_path / "b" / "model.safetensors").read_bytes()


def test_short_training_lowers_loss(trained: tuple[Path, dict]) -> None:
    _, metrics = trained
    assert metrics["final_loss"] < 0.75 * metrics["initial_loss"]
    assert set(metrics["held_out_accuracy"]) >= {"all", "general", "obj", "super"}


def test_saved_folder_reloads_with_identical_predictions(trained: tuple[Path, dict]) -> None:
    out, metrics = trained
    saved = json.loads((out / "training.json").read_text())
    assert saved["seed"] == 0 and saved["steps"] == 200
    processor, model = _load(out)
    assert processor.tokenizer.padding_side == "left"
    acc = evaluate(model, processor, held_out(metrics["held_out_samples"]))
    assert acc == metrics["held_out_accuracy"]


def test_reload_gives_identical_greedy_outputs(tmp_path: Path) -> None:
    model, processor = build_demo(1, tiny=True)
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    loaded_processor, loaded = _load(tmp_path)
    samples = held_out(6)
    prompts = [prompt_for(processor, s) for s in samples]
    images = [s.image() for s in samples]
    a = processor(images=images, text=prompts, return_tensors="pt", padding=True)
    b = loaded_processor(images=images, text=prompts, return_tensors="pt", padding=True)
    assert torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["pixel_values"], b["pixel_values"])
    model.eval()
    with torch.no_grad():
        out_a = model.generate(**a, max_new_tokens=4, do_sample=False)
        out_b = loaded.generate(**b, max_new_tokens=4, do_sample=False)
    assert torch.equal(out_a, out_b)


shipped = pytest.mark.skipif(not (DEMO_DIR / "model.safetensors").exists(), reason="no shipped demo model")


@pytest.fixture(scope="module")
def demo() -> tuple:
    """The shipped model, through the generic loader's two calls."""
    return _load(DEMO_DIR)


@shipped
def test_shipped_folder_is_complete_and_small() -> None:
    names = {p.name for p in DEMO_DIR.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "processor_config.json", "training.json"} <= names
    assert sum(p.stat().st_size for p in DEMO_DIR.iterdir()) < 15 * 2**20
    metrics = json.loads((DEMO_DIR / "training.json").read_text())
    assert metrics["held_out_samples"] >= 1000
    assert metrics["held_out_accuracy"]["all"] >= 0.85


@shipped
def test_shipped_model_matches_the_build(demo: tuple) -> None:
    processor, model = demo
    fresh, fresh_processor = build_demo(0)
    for part in ("text_config", "vision_config"):
        shipped_cfg, built_cfg = getattr(model.config, part).to_dict(), getattr(fresh.config, part).to_dict()
        keys = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "image_size",
                "patch_size", "vocab_size", "num_key_value_heads")
        assert {k: shipped_cfg.get(k) for k in keys} == {k: built_cfg.get(k) for k in keys}, part
    assert model.config.image_token_id == fresh.config.image_token_id
    assert processor.tokenizer.get_vocab() == fresh_processor.tokenizer.get_vocab()
    assert processor.tokenizer.padding_side == "left"


@shipped
def test_shipped_model_counts_and_reads_the_box(demo: tuple) -> None:
    processor, model = demo
    samples = held_out(60)
    answers = predict(model, processor, samples)
    assert sum(a == s.answer for a, s in zip(answers, samples, strict=True)) >= 54
    asked = [s for s in samples if s.question_type != "obj"]
    bare = [s for s in held_out(60, prompt_style="none") if s.question_type != "obj"]
    with_box = sum(a == s.answer for a, s in zip(predict(model, processor, asked), asked, strict=True))
    without = sum(a == s.answer for a, s in zip(predict(model, processor, bare), bare, strict=True))
    assert with_box >= 36 and without <= 24


@shipped
def test_shipped_model_needs_the_image(demo: tuple) -> None:
    processor, model = demo
    samples = held_out(40)
    answers = predict(model, processor, samples, blank=True)
    assert sum(a == s.answer for a, s in zip(answers, samples, strict=True)) <= 20


@shipped
def test_shipped_model_has_visual_heads_that_matter(tmp_path: Path) -> None:
    """At least 4 heads score >= 0.5 on held-out questions, and switching them off costs far more than as many
    random heads (the README's demo table, on fewer questions)."""
    store = str(tmp_path / "heads.duckdb")

    def accuracy(name: str, heads: list[tuple[int, int]]) -> float:
        return run(RunConfig(limit=90, batch_size=30, store=store, name=name, ablate=heads)).accuracy

    with one_thread():
        base = accuracy("base", [])
        with Store(store, read_only=True) as db:
            table = head_table(db, "base")
            visual = [(int(r.layer), int(r.head)) for r in table[table["visual"]].itertuples()]
            randoms = [resolve_heads(f"random:{len(visual)}:{seed}", db, "base") for seed in range(3)]
        top_cost = base - accuracy("top", visual)
        random_cost = base - sum(accuracy(f"random{i}", heads) for i, heads in enumerate(randoms)) / len(randoms)
    assert len(visual) >= 4
    assert top_cost >= 0.25 and top_cost >= 3 * random_cost
