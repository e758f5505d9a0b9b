"""Every figure vheads captures equals a straightforward eager `output_attentions=True` computation."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from PIL import Image
from tiny_models import QUESTIONS
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from vheads.capture import CaptureError, HeadRecorder, ablate
from vheads.models import load

FAMILIES = ["llava", "vipllava", "llava_next", "gemma3"]


def scene(width: int, height: int, seed: int) -> Image.Image:
    """A random RGB image of the given size."""
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8))


def batch(loaded, images, boxes=None, questions=QUESTIONS):
    """Left-padded inputs and the region mask for a list of per-row image lists."""
    prompts = [loaded.adapter.prompt(q, n_images=len(row)) for q, row in zip(questions, images, strict=False)]
    inputs = loaded.adapter.encode(prompts, images)
    region = loaded.adapter.region_mask(images, inputs, boxes) if boxes else None
    return inputs, region


def reference_figures(attn_rows: np.ndarray, input_ids, attention_mask, image_id: int, region=None,
                      prompt_len: int | None = None):
    """Figures from full attention rows [batch, layers, heads, keys], written out plainly in numpy.

    The sink is the first real token that is not an image token (BOS; PaliGemma's BOS comes after the image);
    text is the prompt's tokens (positions before `prompt_len`) that are neither image nor sink."""
    b, layers, heads, keys = attn_rows.shape
    out = {k: np.full((b, layers, heads), np.nan) for k in
           ("visual_weight", "concentration", "region_weight", "text_weight", "sink_weight")}
    for i in range(b):
        real = np.zeros(keys, dtype=bool)
        real[: attention_mask.shape[1]] = attention_mask[i].numpy().astype(bool)
        ids = np.full(keys, -1)
        ids[: input_ids.shape[1]] = input_ids[i].numpy()
        image = (ids == image_id) & real
        sink = np.zeros(keys, dtype=bool)
        sink[np.argmax(real & ~image)] = True
        text = real & ~image & ~sink
        text[prompt_len or keys:] = False
        for layer in range(layers):
            for head in range(heads):
                a = attn_rows[i, layer, head].astype(np.float64)
                w = a[image].sum()
                out["visual_weight"][i, layer, head] = w
                if w > 0 and image.sum() >= 2:
                    p = a[image] / w
                    p = p[p > 0]
                    out["concentration"][i, layer, head] = 1 + (p * np.log(p)).sum() / np.log(image.sum())
                out["text_weight"][i, layer, head] = a[text].sum()
                out["sink_weight"][i, layer, head] = a[sink].sum()
                if region is not None:
                    r = np.zeros(keys, dtype=bool)
                    r[: region.shape[1]] = region[i].numpy()
                    out["region_weight"][i, layer, head] = a[r].sum()
    return out


def eager_rows(eager, inputs, row: int = -1) -> np.ndarray:
    """The attention of query row `row` from eager `output_attentions=True`: [batch, layers, heads, keys]."""
    with torch.no_grad():
        out = eager.model(**inputs, output_attentions=True)
    return torch.stack([a[:, :, row].float() for a in out.attentions], dim=1).numpy()


def assert_figures_close(figures, expected, atol=1e-4):
    for name, value in expected.items():
        got = getattr(figures, name)
        assert got.dtype == np.float32
        np.testing.assert_allclose(got, value, atol=atol, equal_nan=True, err_msg=name)


@pytest.mark.parametrize("family", FAMILIES)
def test_figures_match_eager_on_left_padded_batches(model_dirs, family):
    folder = model_dirs(family)
    fast, eager = load(folder, attn="sdpa"), load(folder, attn="eager")
    images = [[scene(40, 24, 0)], [scene(24, 60, 1)], [scene(32, 32, 2)]]
    boxes = [(2, 2, 20, 14), (0, 30, 24, 60), None]
    inputs, region = batch(fast, images, boxes)
    assert inputs["attention_mask"].min() == 0, "the batch must be padded"
    with torch.no_grad(), HeadRecorder(fast.model, region_mask=region) as rec:
        fast.model(**inputs)
    figures = rec.result()
    config = fast.model.config.get_text_config()
    assert figures.visual_weight.shape == (3, config.num_hidden_layers, config.num_attention_heads)
    expected = reference_figures(eager_rows(eager, inputs), inputs["input_ids"], inputs["attention_mask"],
                                 fast.adapter.image_token_id, region)
    expected["region_weight"][2] = np.nan
    assert_figures_close(figures, expected)
    assert np.nanmax(figures.concentration) > 0.2, "test models must have peaked attention"
    assert list(figures.image_token_count) == (inputs["input_ids"] == fast.adapter.image_token_id).sum(1).tolist()


def test_several_images_in_one_prompt(model_dirs):
    folder = model_dirs("llava")
    fast, eager = load(folder), load(folder, attn="eager")
    images = [[scene(32, 32, 3), scene(48, 32, 4)], [scene(32, 40, 5)]]
    inputs, region = batch(fast, images, [(0, 0, 16, 16), (10, 10, 30, 30)])
    with torch.no_grad(), HeadRecorder(fast.model, region_mask=region) as rec:
        fast.model(**inputs)
    figures = rec.result()
    assert list(figures.image_token_count) == [32, 16]
    expected = reference_figures(eager_rows(eager, inputs), inputs["input_ids"], inputs["attention_mask"],
                                 fast.adapter.image_token_id, region)
    assert_figures_close(figures, expected)


def test_generate_readouts_match_eager_on_the_full_sequence(model_dirs):
    folder = model_dirs("llava")
    fast, eager = load(folder), load(folder, attn="eager")
    images = [[scene(32, 32, 6)], [scene(40, 32, 7)]]
    inputs, _ = batch(fast, images)
    prompt_len = inputs["input_ids"].shape[1]
    with torch.no_grad():
        probe = fast.model.generate(**inputs, max_new_tokens=5, do_sample=False)
    eos = int(probe[0, prompt_len + 1])  # row 0 ends after its second token
    results = {}
    for readout in ("prompt", "first-generated", "generated"):
        with torch.no_grad(), HeadRecorder(fast.model, readout=readout, eos_token_ids=[eos]) as rec:
            out = fast.model.generate(**inputs, max_new_tokens=5, do_sample=False, eos_token_id=eos)
        results[readout] = rec.result()
    full_mask = torch.cat([inputs["attention_mask"], torch.ones_like(out[:, prompt_len:])], dim=1)
    with torch.no_grad():
        att = eager.model(input_ids=out, attention_mask=full_mask, pixel_values=inputs["pixel_values"],
                          output_attentions=True).attentions
    rows = torch.stack([a.float() for a in att], dim=1).numpy()
    image_id = fast.adapter.image_token_id

    def figures_at(positions_per_row):
        per_row = []
        for i, positions in enumerate(positions_per_row):
            parts = [reference_figures(rows[i:i + 1, :, :, p], out[i:i + 1], full_mask[i:i + 1], image_id,
                                       prompt_len=prompt_len) for p in positions]
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)
                per_row.append({k: np.nanmean([part[k] for part in parts], axis=0) for k in parts[0]})
        return {k: np.concatenate([r[k] for r in per_row]) for k in per_row[0]}

    assert_figures_close(results["prompt"], figures_at([[prompt_len - 1]] * 2))
    assert_figures_close(results["first-generated"], figures_at([[prompt_len]] * 2))
    generated_len = [2, out.shape[1] - prompt_len]
    for i in range(2):
        tokens = out[i, prompt_len:].tolist()
        if eos in tokens:
            generated_len[i] = tokens.index(eos) + 1
    expected = figures_at([list(range(prompt_len - 1, prompt_len - 1 + n)) for n in generated_len])
    assert list(results["generated"].readout_steps) == generated_len
    assert_figures_close(results["generated"], expected)


def test_first_generated_on_a_single_forward_is_nan(model_dirs):
    fast = load(model_dirs("llava"))
    inputs, _ = batch(fast, [[scene(32, 32, 8)]])
    with torch.no_grad(), HeadRecorder(fast.model, readout="first-generated") as rec:
        fast.model(**inputs)
    figures = rec.result()
    assert np.isnan(figures.visual_weight).all() and list(figures.readout_steps) == [0]


def _o_proj_hook(model, layer: int, edit):
    attn = model.model.language_model.layers[layer].self_attn
    return attn.o_proj.register_forward_pre_hook(lambda module, args: (edit(args[0].clone()),))


def test_zero_ablation_equals_zeroing_the_heads_o_proj_input(model_dirs):
    fast = load(model_dirs("llava"))
    inputs, _ = batch(fast, [[scene(32, 32, 9)], [scene(48, 32, 10)]])
    head_dim = fast.model.config.text_config.head_dim or 16
    with torch.no_grad(), ablate(fast.model, [(1, 2), (2, 0)]):
        ablated = fast.model(**inputs).logits

    def zero(head):
        def edit(x):
            x[..., head * head_dim:(head + 1) * head_dim] = 0
            return x
        return edit

    hooks = [_o_proj_hook(fast.model, 1, zero(2)), _o_proj_hook(fast.model, 2, zero(0))]
    with torch.no_grad():
        reference = fast.model(**inputs).logits
    for h in hooks:
        h.remove()
    torch.testing.assert_close(ablated, reference, atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        assert not torch.allclose(fast.model(**inputs).logits, ablated)


def test_uniform_ablation_equals_uniform_weights_over_visible_keys(model_dirs):
    fast = load(model_dirs("llava"))
    inputs, _ = batch(fast, [[scene(32, 32, 11)], [scene(40, 32, 12)]])
    config = fast.model.config.text_config
    head, layer = 3, 1
    head_dim = config.hidden_size // config.num_attention_heads
    group = config.num_attention_heads // config.num_key_value_heads
    attn = fast.model.model.language_model.layers[layer].self_attn
    values = {}
    grab = attn.v_proj.register_forward_hook(lambda m, a, out: values.__setitem__("v", out))

    def uniform(x):
        v = values["v"][..., (head // group) * head_dim:(head // group + 1) * head_dim]
        mask = inputs["attention_mask"].bool()
        seq = x.shape[1]
        visible = torch.tril(torch.ones(seq, seq, dtype=torch.bool))[None] & mask[:, None, :]
        weights = visible.float() / visible.sum(-1, keepdim=True).clamp(min=1)
        x[..., head * head_dim:(head + 1) * head_dim] = weights @ v
        return x

    hook = _o_proj_hook(fast.model, layer, uniform)
    with torch.no_grad():
        reference = fast.model(**inputs).logits
    hook.remove()
    with torch.no_grad(), ablate(fast.model, [(layer, head)], mode="uniform"), HeadRecorder(fast.model) as rec:
        ablated = fast.model(**inputs).logits
    grab.remove()
    real = inputs["attention_mask"].bool()
    torch.testing.assert_close(ablated[real], reference[real], atol=1e-5, rtol=1e-5)
    figures = rec.result()
    n_visible = inputs["attention_mask"].sum(1).numpy()
    n_image = figures.image_token_count
    np.testing.assert_allclose(figures.visual_weight[:, layer, head], n_image / n_visible, atol=1e-6)
    np.testing.assert_allclose(figures.concentration[:, layer, head], 0.0, atol=1e-6)


def test_model_is_restored_after_exit_and_after_an_exception(model_dirs):
    fast = load(model_dirs("llava"))
    config = fast.model.config
    before = (config.text_config._attn_implementation, config.vision_config._attn_implementation)
    inputs, _ = batch(fast, [[scene(32, 32, 13)]])
    with torch.no_grad():
        clean = fast.model(**inputs).logits
    with pytest.raises(RuntimeError, match="boom"), HeadRecorder(fast.model), ablate(fast.model, [(0, 0)]):
        assert config.text_config._attn_implementation.startswith("vheads_")
        assert config.vision_config._attn_implementation == before[1], "the vision tower is never rerouted"
        raise RuntimeError("boom")
    assert (config.text_config._attn_implementation, config.vision_config._attn_implementation) == before
    assert not [k for k in ALL_ATTENTION_FUNCTIONS._global_mapping if k.startswith("vheads_")]
    assert not [k for k in ALL_MASK_ATTENTION_FUNCTIONS._global_mapping if k.startswith("vheads_")]
    assert not fast.model._forward_pre_hooks
    with torch.no_grad():
        torch.testing.assert_close(fast.model(**inputs).logits, clean)


def test_recording_does_not_change_the_output(model_dirs):
    fast = load(model_dirs("llava_next"))
    inputs, _ = batch(fast, [[scene(60, 30, 14)], [scene(30, 30, 15)]])
    with torch.no_grad():
        clean = fast.model(**inputs).logits
        with HeadRecorder(fast.model):
            recorded = fast.model(**inputs).logits
    torch.testing.assert_close(recorded, clean)


def test_capture_wraps_the_eager_kernel_too(model_dirs):
    eager = load(model_dirs("vipllava"), attn="eager")
    inputs, _ = batch(eager, [[scene(32, 32, 16)], [scene(50, 30, 17)]])
    expected = reference_figures(eager_rows(eager, inputs), inputs["input_ids"], inputs["attention_mask"],
                                 eager.adapter.image_token_id)
    with torch.no_grad(), HeadRecorder(eager.model) as rec:
        eager.model(**inputs)
    assert eager.model.config.text_config._attn_implementation == "eager"
    assert_figures_close(rec.result(), expected)


def test_bf16_models_give_fp32_figures_close_to_the_fp32_model(model_dirs):
    from tiny_models import sharpen

    folder = model_dirs("llava")
    results = []
    for dtype in ("float32", "bfloat16"):
        loaded = load(folder, dtype=dtype)
        sharpen(loaded.model, 1 / 10)  # realistic logit sizes: bf16 rounding must not flip the softmax
        inputs, _ = batch(loaded, [[scene(32, 32, 18)], [scene(40, 30, 19)]])
        inputs["pixel_values"] = inputs["pixel_values"].to(loaded.model.dtype)
        with torch.no_grad(), HeadRecorder(loaded.model) as rec:
            loaded.model(**inputs)
        results.append(rec.result())
    full, half = results
    assert half.visual_weight.dtype == np.float32
    for name in ("visual_weight", "text_weight", "sink_weight"):
        np.testing.assert_allclose(getattr(half, name), getattr(full, name), atol=2e-2, err_msg=name)
    total = half.visual_weight + half.text_weight + half.sink_weight
    np.testing.assert_allclose(total, 1.0, atol=1e-5)


def test_inputs_embeds_without_ids_is_a_clear_error(model_dirs):
    fast = load(model_dirs("llava"))
    inputs, _ = batch(fast, [[scene(32, 32, 20)]])
    embeds = fast.model.get_input_embeddings()(inputs["input_ids"])
    with pytest.raises(CaptureError, match="input_ids"), torch.no_grad(), HeadRecorder(fast.model):
        fast.model.model.language_model(inputs_embeds=embeds)
        fast.model(inputs_embeds=embeds, attention_mask=inputs["attention_mask"])


def test_ablating_a_head_that_does_not_exist_names_it(model_dirs):
    fast = load(model_dirs("llava"))
    with pytest.raises(ValueError, match=r"7\.0 do not exist"), ablate(fast.model, [(7, 0)]):
        pass
    assert not fast.model.config.text_config._attn_implementation.startswith("vheads_")


def reference_probabilities(query, key, bias, rows, scaling):
    """softmax(q·kᵀ·scale + bias) of every row, picked afterwards: [batch, heads, r, kv]."""
    group = query.shape[1] // key.shape[1]
    logits = torch.einsum("bhqd,bhkd->bhqk", query, key.repeat_interleave(group, dim=1)) * scaling + bias
    probs = torch.nan_to_num(torch.softmax(logits, dim=-1), nan=0.0)
    return torch.stack([probs[i, :, rows[i]] for i in range(query.shape[0])])


@pytest.mark.parametrize("mask_kind", ["bool4d", "float4d", "padding2d", "none"])
def test_readout_rows_by_index_or_shared_give_the_same_probabilities(mask_kind):
    from vheads.capture.session import AttentionCall

    torch.manual_seed(0)
    b, h, kvh, q_len, d = 3, 4, 2, 7, 8
    query, key = torch.randn(b, h, q_len, d), torch.randn(b, kvh, q_len, d)
    padding = torch.ones(b, q_len, dtype=torch.bool)
    padding[1, :2] = False
    padding[2, :4] = False
    causal = torch.ones(q_len, q_len).tril().bool()
    allowed = causal[None] & padding[:, None, :]
    bias = torch.zeros(b, 1, q_len, q_len).masked_fill(~allowed[:, None], float("-inf"))
    mask = {"bool4d": allowed[:, None], "float4d": bias.masked_fill(~allowed[:, None], torch.finfo(torch.float32).min),
            "padding2d": padding.long(), "none": None}[mask_kind]
    if mask_kind == "none":
        bias = torch.zeros(1, 1, q_len, q_len).masked_fill(~causal, float("-inf"))
    call = AttentionCall(0, torch.nn.Module(), query, key, key, mask, {"scaling": 0.3}, [])
    last = torch.full((b, 1), q_len - 1)
    expected = reference_probabilities(query, key, bias, last, 0.3)
    torch.testing.assert_close(call.probabilities(q_len - 1), expected)
    torch.testing.assert_close(call.probabilities(last), expected)
    some = torch.tensor([[6, 5], [4, 6], [6, 5]])
    torch.testing.assert_close(call.probabilities(some), reference_probabilities(query, key, bias, some, 0.3))
