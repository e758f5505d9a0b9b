"""Every supported family loads from a saved folder on a machine without torchvision, captures exactly, and runs."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from tiny_models import BUILDERS

from vheads.models import load
from vheads.models.processors import (
    PixtralProcessor,
    load_processor,
    needs_torchvision_free_route,
    processor_class_name,
)

FAMILIES = sorted(BUILDERS)
PROCESSORS = {"llava": "LlavaProcessor", "vipllava": "LlavaProcessor", "llava_next": "LlavaNextProcessor",
              "gemma3": "Gemma3Processor", "qwen2_vl": "Qwen2VLProcessor", "qwen2_5_vl": "Qwen2_5_VLProcessor",
              "qwen3_vl": "Qwen3VLProcessor", "qwen3_5": "Qwen3VLProcessor", "glm4v": "Glm4vProcessor",
              "internvl": "InternVLProcessor", "llava_onevision": "LlavaOnevisionProcessor",
              "smolvlm": "SmolVLMProcessor", "idefics3": "Idefics3Processor", "paligemma": "PaliGemmaProcessor",
              "mistral3": "PixtralProcessor"}


def scene(width: int, height: int, seed: int) -> Image.Image:
    """A random RGB image of the given size."""
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def loaded(model_dirs):
    """family -> the tiny model of that family loaded through `vheads.models.load` (sdpa), once per module."""
    cache = {}

    def get(family: str, attn: str = "sdpa"):
        if (family, attn) not in cache:
            cache[family, attn] = load(model_dirs(family), attn=attn)
        return cache[family, attn]

    return get


@pytest.mark.parametrize("family", FAMILIES)
def test_each_family_loads_with_its_own_processor_class(model_dirs, loaded, family):
    folder = model_dirs(family)
    assert processor_class_name(str(folder)) == PROCESSORS[family]
    images_only = load_processor(str(folder), family)
    assert type(images_only).__name__ == PROCESSORS[family]
    assert not hasattr(images_only, "video_processor")
    model = loaded(family)
    if needs_torchvision_free_route():
        assert type(model.processor) is type(images_only)
    assert model.processor.tokenizer.padding_side == "left"
    images = [[scene(40, 24, 0)], [scene(24, 60, 1)]]
    prompts = [model.adapter.prompt(q) for q in ("what is in the image ?", "how many red circles are there ?")]
    inputs = model.adapter.encode(prompts, images)
    image_tokens = (inputs["input_ids"] == model.adapter.image_token_id).sum(1)
    assert (image_tokens > 0).all()
    with torch.no_grad():
        logits = model.model(**inputs).logits
    assert torch.isfinite(logits[:, -1]).all()


def test_pixtral_processor_lays_out_rows_of_image_tokens(model_dirs):
    processor = load_processor(str(model_dirs("mistral3")), "mistral3")
    assert isinstance(processor, PixtralProcessor)
    inputs = processor(images=[scene(40, 24, 2)], text=["[IMG] what ?"], return_tensors="pt")
    height, width = inputs["image_sizes"][0].tolist()
    cell = processor.patch_size * processor.spatial_merge_size
    rows, cols = height // cell, width // cell
    tokens = processor.tokenizer.convert_ids_to_tokens(inputs["input_ids"][0].tolist())
    layout = tokens[tokens.index("[IMG]"): tokens.index("[IMG_END]") + 1]
    expected = ((["[IMG]"] * cols + ["[IMG_BREAK]"]) * rows)[:-1] + ["[IMG_END]"]
    assert layout == expected and rows * cols > 1
    assert height % cell == 0 and width % cell == 0


def test_a_folder_naming_a_processor_transformers_cannot_build_is_one_clear_line(model_dirs, tmp_path):
    import shutil

    from vheads.models import ModelError

    folder = tmp_path / "broken"
    shutil.copytree(model_dirs("qwen2_vl"), folder)
    config = json.loads((folder / "processor_config.json").read_text())
    config["processor_class"] = "NoSuchProcessor"
    (folder / "processor_config.json").write_text(json.dumps(config))
    with pytest.raises(ModelError, match=r"\(qwen2_vl\).*NoSuchProcessor") as error:
        load(folder)
    assert "\n" not in str(error.value)


def eager_attention_rows(eager, inputs, layers: list[int], total: int) -> np.ndarray:
    """The last query row of eager `output_attentions=True`, [batch, total layers, heads, keys]; NaN rows for the
    layers without softmax attention (eager returns weights for the attention layers only)."""
    with torch.no_grad():
        attentions = [a for a in eager.model(**inputs, output_attentions=True).attentions if a is not None]
    assert len(attentions) == len(layers)
    first = attentions[0]
    rows = np.full((first.shape[0], total, first.shape[1], first.shape[-1]), np.nan, dtype=np.float32)
    for layer, a in zip(layers, attentions, strict=True):
        rows[:, layer] = a[:, :, -1].float().numpy()
    return rows


@pytest.mark.parametrize("family", FAMILIES)
def test_figures_match_eager_on_a_left_padded_batch(loaded, family):
    from test_capture import assert_figures_close, reference_figures

    from vheads.capture import HeadRecorder, attention_layer_indices

    fast, eager = loaded(family), loaded(family, "eager")
    images = [[scene(40, 24, 3)], [scene(24, 60, 4)]]
    prompts = [fast.adapter.prompt(q) for q in ("how many red circles are there ?", "what ?")]
    inputs = fast.adapter.encode(prompts, images)
    assert inputs["attention_mask"].min() == 0, "the batch must be left-padded"
    image = inputs["input_ids"] == fast.adapter.image_token_id
    region = image & (image.cumsum(dim=1) % 3 == 1)
    region[1] = False
    with torch.no_grad(), HeadRecorder(fast.model, region_mask=region) as rec:
        fast.model(**inputs)
    figures = rec.result()
    text = fast.model.config.get_text_config()
    layers = attention_layer_indices(fast.model)
    rows = eager_attention_rows(eager, inputs, layers, int(text.num_hidden_layers))
    expected = reference_figures(rows, inputs["input_ids"], inputs["attention_mask"], fast.adapter.image_token_id,
                                 region)
    expected["region_weight"][1] = np.nan
    concentration = expected.pop("concentration")
    assert_figures_close(figures, expected, atol=1e-4)
    np.testing.assert_allclose(figures.concentration, concentration, atol=1e-3, equal_nan=True)
    assert np.nanmax(figures.concentration) > 0.2, "test models must have peaked attention"
    total = figures.visual_weight + figures.text_weight + figures.sink_weight
    np.testing.assert_allclose(total[:, layers], 1.0, atol=1e-5)
    assert np.isnan(np.delete(total, layers, axis=1)).all()


@pytest.mark.parametrize("family", FAMILIES)
def test_vheads_run_on_a_saved_folder_end_to_end(model_dirs, tmp_path, family):
    from typer.testing import CliRunner

    from vheads.cli import app
    from vheads.store import Store

    store = str(tmp_path / "s.duckdb")
    result = CliRunner().invoke(app, ["run", "--model", str(model_dirs(family)), "--dataset", "shapes", "--limit", "2",
                                      "--batch-size", "2", "--max-new-tokens", "2", "--store", store, "--name", family])
    assert result.exit_code == 0, result.output
    with Store(store, read_only=True) as db:
        info = db.run(family)
        samples = db.query("SELECT image_tokens FROM samples")
        stats = db.query("SELECT layer, count(visual_weight) AS measured, count(*) AS n FROM head_stats GROUP BY 1")
    assert info["status"] == "done" and info["family"] and len(samples) == 2
    assert (samples["image_tokens"] > 0).all()
    attention = info["config"]["attention_layers"]
    measured = stats.set_index("layer")["measured"]
    assert sorted(measured[measured > 0].index) == attention


def test_hybrid_layers_are_recorded_and_kept_out_of_ranking_selectors_and_ablation(model_dirs, loaded, tmp_path):
    from vheads.analysis.ranking import head_table, weights_array
    from vheads.analysis.selectors import resolve_heads, run_option_heads
    from vheads.capture import ablate, attention_layer_indices, config_attention_layers
    from vheads.pipeline.config import RunConfig
    from vheads.pipeline.run import run
    from vheads.store import Store

    hybrid = loaded("qwen3_5")
    attention = attention_layer_indices(hybrid.model)
    assert attention == [2, 4] == config_attention_layers(hybrid.model.config.get_text_config())
    store = str(tmp_path / "s.duckdb")
    run(RunConfig(model=hybrid.name, limit=2, batch_size=2, max_new_tokens=1, store=store, name="h"), loaded=hybrid)
    with Store(store, read_only=True) as db:
        assert db.run("h")["config"]["attention_layers"] == attention
        w, _ = weights_array(db, "h")
        table = head_table(db, "h")
        random = resolve_heads("random:6:1", db, "h")
        stage = resolve_heads("stage:late", db, "h")
        top = resolve_heads("top:8", db, "h")
        late = resolve_heads("late:2", db, "h")
    assert np.isnan(w[:, [0, 1, 3]]).all() and np.isfinite(w[:, attention]).all()
    assert sorted(set(table["layer"])) == attention and len(table) == 2 * 4
    assert table.attrs["attention_layers"] == attention
    for heads in (random, stage, top, late):
        assert heads and {layer for layer, _ in heads} <= set(attention)
    assert len(random) == 6 and len(top) == 8
    model_random = run_option_heads("random:8", None, store, str(model_dirs("qwen3_5")))
    assert sorted(model_random) == [(layer, head) for layer in attention for head in range(4)]
    with pytest.raises(ValueError, match="no softmax attention"), ablate(hybrid.model, [(0, 1)]):
        pass
    with pytest.raises(ValueError, match="without softmax attention"):
        run(RunConfig(model=hybrid.name, limit=2, ablate=[(1, 0)], store=store, name="bad"), loaded=hybrid)


def test_hybrid_generated_readout_matches_eager_on_the_full_sequence(loaded):
    from test_capture import assert_figures_close, reference_figures

    from vheads.capture import HeadRecorder, attention_layer_indices

    fast, eager = loaded("qwen3_5"), loaded("qwen3_5", "eager")
    images = [[scene(40, 24, 5)], [scene(24, 60, 6)]]
    prompts = [fast.adapter.prompt(q) for q in ("how many red circles are there ?", "what ?")]
    inputs = fast.adapter.encode(prompts, images)
    prompt_len = inputs["input_ids"].shape[1]
    with torch.no_grad(), HeadRecorder(fast.model, readout="generated", eos_token_ids=[]) as rec:
        out = fast.model.generate(**inputs, max_new_tokens=2, min_new_tokens=2, do_sample=False)
    figures = rec.result()
    assert list(figures.readout_steps) == [2, 2]
    mask = torch.cat([inputs["attention_mask"], torch.ones_like(out[:, prompt_len:])], dim=1)
    full = {**inputs, "input_ids": out, "attention_mask": mask}
    if "mm_token_type_ids" in inputs:
        full["mm_token_type_ids"] = torch.nn.functional.pad(inputs["mm_token_type_ids"], (0, out.shape[1] - prompt_len))
    layers = attention_layer_indices(fast.model)
    with torch.no_grad():
        attentions = eager.model(**full, output_attentions=True).attentions
    steps = []
    for position in range(prompt_len - 1, prompt_len + 1):
        rows = np.full((2, 5, 4, out.shape[1]), np.nan, dtype=np.float32)
        for layer, a in zip(layers, attentions, strict=True):
            rows[:, layer] = a[:, :, position].float().numpy()
        steps.append(reference_figures(rows, out, mask, fast.adapter.image_token_id, prompt_len=prompt_len))
    expected = {k: np.mean([s[k] for s in steps], axis=0) for k in steps[0]}
    assert_figures_close(figures, expected)
