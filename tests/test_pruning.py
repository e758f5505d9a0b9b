"""Image-blind, flow-blind and FastV generate exactly what an eager model with those keys masked generates.

The reference is a test-only attention function: the family's own eager kernel, run one head at a time with the
layer's mask plus the keys the mode takes out (FastV: every head, ranked at layer K-1 from the eager weights), with
the image positions read from the prefill's input ids. It shares no code with `vheads.capture`.
"""

from __future__ import annotations

import math
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from tiny_models import BUILDERS
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

from vheads.capture import HeadRecorder, ablate, attention_layer_indices, cache_bytes, fastv
from vheads.compat import (
    generate_cache_keyword,
    register_attention,
    set_attention_implementation,
    unregister_attention,
)
from vheads.models import load
from vheads.models.layers import language_layers

FAMILIES = sorted(BUILDERS)


def scene(width: int, height: int, seed: int) -> Image.Image:
    """A random RGB image of the given size."""
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def loaded(model_dirs):
    """(family, attn) -> the tiny model loaded through `vheads.models.load`, once per module."""
    cache = {}

    def get(family: str, attn: str = "sdpa"):
        if (family, attn) not in cache:
            cache[family, attn] = load(model_dirs(family), attn=attn, dtype="float32")
        return cache[family, attn]

    return get


def padded_batch(loaded):
    """Two left-padded prompts, the first about two images, the second about one."""
    images = [[scene(40, 24, 1), scene(32, 32, 2)], [scene(24, 60, 3)]]
    questions = ["how many red circles are there ?", "what ?"]
    prompts = [loaded.adapter.prompt(q, n_images=len(row)) for q, row in zip(questions, images, strict=True)]
    inputs = loaded.adapter.encode(prompts, images)
    assert inputs["attention_mask"].min() == 0, "the batch must be left-padded"
    return inputs


def chosen_heads(model) -> list[tuple[int, int]]:
    """A whole key/value group of the first attention layer, one head of the second, three of the last."""
    layers = attention_layer_indices(model)
    return sorted({(layers[0], 0), (layers[0], 1), (layers[1], 2), (layers[-1], 0), (layers[-1], 1),
                   (layers[-1], 3)})


class _OneGroup:
    """The attention module seen by a kernel run on one query head and its one key/value head."""

    def __init__(self, module):
        self._module = module
        self.num_key_value_groups = 1

    def __getattr__(self, name):
        return getattr(self._module, name)


class MaskedEager:
    """Test-only attention function on an eager model: `mode` "image-blind" / "flow-blind" for `heads`, or "fastv"
    with `layer` K and `keep` R. Rows left with no key give 0."""

    def __init__(self, loaded, mode: str, heads=(), layer: int | None = None, keep: float | None = None):
        self.model = loaded.model
        self.image_id = loaded.adapter.image_token_id
        self.mode, self.heads, self.layer, self.keep = mode, set(heads), layer, keep
        self.name = f"test_masked_eager_{id(self)}"
        self.image = None
        self.total = 0
        self.dropped = None
        self.kept_counts = []

    def __enter__(self):
        register_attention(self.name, self, "eager")
        self.configs = language_layers(self.model)[1]
        for config in self.configs:
            set_attention_implementation(config, self.name)
        self.hook = self.model.register_forward_pre_hook(self.pre_forward, with_kwargs=True)
        return self

    def __exit__(self, *exc):
        self.hook.remove()
        for config in self.configs:
            set_attention_implementation(config, "eager")
        unregister_attention(self.name)

    def pre_forward(self, module, args, kwargs):
        ids = kwargs["input_ids"]
        if ids.shape[1] > 1:  # prefill
            self.image = (ids == self.image_id) & kwargs["attention_mask"].bool()
            self.last = ids.shape[1] - 1  # left padding: every row's prompt ends at the last position
            self.total = ids.shape[1]
            self.dropped = None
        else:
            self.total += 1

    def image_at(self, length: int) -> torch.Tensor:
        """Image flags of the sequence's last `length` positions, [batch, length]."""
        full = torch.zeros(self.image.shape[0], self.total, dtype=torch.bool)
        full[:, : self.image.shape[1]] = self.image
        return full[:, self.total - length:]

    def __call__(self, module, query, key, value, mask, **kwargs):
        eager = sys.modules[type(module).__module__].eager_attention_forward
        layer = module.layer_idx
        q_len, kv_len = query.shape[2], key.shape[2]
        lowest = torch.finfo(mask.dtype).min
        image_keys = self.image_at(kv_len)
        if self.mode == "fastv":
            blocked = self.dropped if layer >= self.layer and self.dropped is not None else None
            m = mask if blocked is None else mask.masked_fill(self.to_keys(blocked, kv_len)[:, None, None], lowest)
            out, weights = eager(module, query, key, value, m, **kwargs)
            if layer == self.layer - 1 and q_len > 1:
                self.rank(weights[:, :, self.last].mean(dim=1))
            return out, weights
        group = query.shape[1] // key.shape[1]
        outs = []
        for head in range(query.shape[1]):
            m = mask
            if (layer, head) in self.heads:
                blocked = image_keys[:, None, :].expand(-1, q_len, -1)
                if self.mode == "flow-blind":
                    blocked = blocked & ~self.image_at(q_len)[:, :, None]
                m = mask.masked_fill(blocked[:, None], lowest)
            kv = head // group
            out, _ = eager(_OneGroup(module), query[:, head:head + 1], key[:, kv:kv + 1], value[:, kv:kv + 1], m,
                           **kwargs)
            sees_nothing = (m[:, 0, :, :kv_len] <= lowest / 2).all(dim=-1)  # [batch, q]
            outs.append(out.masked_fill(sees_nothing[:, :, None, None], 0.0))
        return torch.cat(outs, dim=2), None

    def to_keys(self, dropped: torch.Tensor, kv_len: int) -> torch.Tensor:
        full = torch.zeros(dropped.shape[0], self.total, dtype=torch.bool)
        full[:, : dropped.shape[1]] = dropped
        return full[:, self.total - kv_len:]

    def rank(self, attention: torch.Tensor) -> None:
        """Keep each row's ceil(R * n) most-attended image tokens (ties to the earlier one); drop the rest."""
        self.dropped = self.image.clone()
        for row in range(self.image.shape[0]):
            positions = [p for p in range(self.image.shape[1]) if self.image[row, p]]
            scores = [float(attention[row, p]) for p in positions]
            order = sorted(range(len(positions)), key=lambda i: -scores[i])  # sorted() is stable
            n = math.ceil(self.keep * len(positions))
            for i in order[:n]:
                self.dropped[row, positions[i]] = False
            self.kept_counts.append(n)


def greedy(model, inputs, steps: int = 3):
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=steps, min_new_tokens=steps, do_sample=False,
                             output_logits=True, return_dict_in_generate=True)
    return out.sequences, torch.stack(out.logits, dim=1)


def fastv_layer(model) -> int:
    """A FastV layer K whose layer K-1 has softmax attention (hybrid decoders) and is not the last."""
    layers = attention_layer_indices(model)
    return next(layer + 1 for layer in layers if layer + 1 < len(language_layers(model)[0]))


@pytest.mark.parametrize("family", FAMILIES)
def test_modes_generate_what_the_masked_eager_reference_generates(loaded, family):
    fast, eager = loaded(family), loaded(family, "eager")
    inputs = padded_batch(fast)
    heads = chosen_heads(fast.model)
    k = fastv_layer(fast.model)
    plain_tokens, plain_logits = greedy(fast.model, inputs)
    for mode in ("image-blind", "flow-blind", "fastv"):
        context = (fastv(fast.model, layer=k, keep=0.5) if mode == "fastv"
                   else ablate(fast.model, heads, mode=mode))
        reference = MaskedEager(eager, mode, heads, layer=k, keep=0.5)
        with context as ctx:
            tokens, logits = greedy(fast.model, inputs)
        with reference:
            ref_tokens, ref_logits = greedy(eager.model, inputs)
        assert torch.equal(tokens, ref_tokens), mode
        torch.testing.assert_close(logits, ref_logits, atol=1e-4, rtol=1e-4, msg=mode)
        assert torch.isfinite(logits).all()
        assert not torch.allclose(logits, plain_logits, atol=1e-3), f"{mode} must change the logits"
        if mode == "fastv":
            assert ctx.kept_counts() == reference.kept_counts
            assert [len(k) for k in ctx.kept] == reference.kept_counts
    assert plain_tokens.shape == tokens.shape


@pytest.mark.parametrize("family", ["llava", "gemma3", "paligemma"])
def test_models_loaded_eager_give_the_same_as_the_reference(loaded, family):
    eager = loaded(family, "eager")
    inputs = padded_batch(eager)
    heads = chosen_heads(eager.model)
    for mode in ("image-blind", "flow-blind"):
        with ablate(eager.model, heads, mode=mode):
            tokens, logits = greedy(eager.model, inputs)
        with MaskedEager(eager, mode, heads):
            ref_tokens, ref_logits = greedy(eager.model, inputs)
        assert torch.equal(tokens, ref_tokens), mode
        torch.testing.assert_close(logits, ref_logits, atol=1e-4, rtol=1e-4, msg=mode)


def test_the_reference_itself_fails_on_wrong_masks(loaded):
    """Guard: the comparison above can fail (blinding other heads gives other logits)."""
    fast, eager = loaded("llava"), loaded("llava", "eager")
    inputs = padded_batch(fast)
    with ablate(fast.model, [(0, 0), (1, 1)], mode="image-blind"):
        _, logits = greedy(fast.model, inputs)
    with MaskedEager(eager, "image-blind", [(0, 0), (1, 2)]):
        _, ref_logits = greedy(eager.model, inputs)
    assert not torch.allclose(logits, ref_logits, atol=1e-4)


def test_image_blind_without_image_tokens_is_the_plain_model(loaded):
    fast = loaded("llava")
    text = fast.processor.tokenizer(["how many red circles are there ?", "what ?"], padding=True,
                                    return_tensors="pt")
    inputs = {"input_ids": text["input_ids"], "attention_mask": text["attention_mask"]}
    plain_tokens, plain_logits = greedy(fast.model, inputs)
    with ablate(fast.model, chosen_heads(fast.model), mode="image-blind"):
        tokens, logits = greedy(fast.model, inputs)
    assert torch.equal(tokens, plain_tokens)
    assert torch.equal(logits, plain_logits)


def test_every_head_image_blind_answers_as_if_there_were_no_image_keys(loaded):
    """All heads image-blind: the text rows never read the image, so the answer cannot depend on the pixels."""
    fast = loaded("llava")
    inputs = padded_batch(fast)
    other = {**inputs, "pixel_values": torch.randn_like(inputs["pixel_values"])}
    every = [(layer, head) for layer in range(3) for head in range(4)]
    with ablate(fast.model, every, mode="image-blind"):
        _, logits = greedy(fast.model, inputs)
        _, other_logits = greedy(fast.model, other)
    torch.testing.assert_close(logits, other_logits, atol=1e-5, rtol=1e-5)
    _, plain = greedy(fast.model, inputs)
    _, plain_other = greedy(fast.model, other)
    assert not torch.allclose(plain, plain_other, atol=1e-3)


def test_image_rows_that_see_only_image_keys_give_zero_not_nan(loaded):
    """PaliGemma puts the image first: with every head image-blind an image row sees no key at all."""
    fast = loaded("paligemma")
    inputs = padded_batch(fast)
    every = [(layer, head) for layer in attention_layer_indices(fast.model) for head in range(4)]
    with torch.no_grad(), ablate(fast.model, every, mode="image-blind"):
        logits = fast.model(**inputs).logits
    assert torch.isfinite(logits).all()


def test_bare_language_model_takes_the_image_token_id(tmp_path):
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=32, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    model = LlamaForCausalLM(config).eval()
    ids = torch.tensor([[1, 5, 5, 5, 7, 8, 9, 3]])
    with pytest.raises(ValueError, match="image_token_id"):
        ablate(model, [(0, 0)], mode="image-blind")
    with pytest.raises(ValueError, match="image_token_id"):
        fastv(model, layer=1, keep=0.5)
    with torch.no_grad():
        plain = model(input_ids=ids).logits
        with ablate(model, [(0, 0), (0, 1), (1, 3)], mode="image-blind", image_token_id=5):
            blind = model(input_ids=ids).logits
        with ablate(model, [(0, 0)], mode="image-blind", image_token_id=6):
            absent = model(input_ids=ids).logits
    torch.testing.assert_close(blind[:, :1], plain[:, :1])  # the row before the first image token sees no image key
    assert not torch.allclose(blind[:, 4:], plain[:, 4:], atol=1e-4)
    assert torch.equal(absent, plain)


@pytest.mark.parametrize(("layer", "keep", "message"), [(0, 0.5, "at least 1"), (3, 0.5, "not below"),
                                                        (1, 0.0, r"keep must be in \(0, 1\]"),
                                                        (1, 1.5, r"keep must be in \(0, 1\]")])
def test_fastv_rejects_bad_settings_in_one_line(loaded, layer, keep, message):
    fast = loaded("llava")
    with pytest.raises(ValueError, match=message) as error, fastv(fast.model, layer=layer, keep=keep):
        pass
    assert "\n" not in str(error.value)
    assert not fast.model.config.text_config._attn_implementation.startswith("vheads_")


def test_fastv_keeping_every_image_token_is_the_plain_model(loaded):
    fast = loaded("llava")
    inputs = padded_batch(fast)
    _, plain = greedy(fast.model, inputs)
    with fastv(fast.model, layer=1, keep=1.0) as pruned:
        _, logits = greedy(fast.model, inputs)
    assert torch.equal(logits, plain)
    n_image = (inputs["input_ids"] == fast.adapter.image_token_id).sum(1).tolist()
    assert pruned.kept_counts() == n_image


def test_recorder_sees_no_image_weight_on_image_blind_heads(loaded):
    fast = loaded("llava")
    inputs = padded_batch(fast)
    heads = chosen_heads(fast.model)
    with torch.no_grad(), ablate(fast.model, heads, mode="image-blind"), HeadRecorder(fast.model) as rec:
        fast.model(**inputs)
    figures = rec.result()
    for layer, head in heads:
        np.testing.assert_allclose(figures.visual_weight[:, layer, head], 0.0, atol=1e-7)
    total = figures.visual_weight + figures.text_weight + figures.sink_weight
    np.testing.assert_allclose(total, 1.0, atol=1e-5)
    others = [(layer, head) for layer in range(3) for head in range(4) if (layer, head) not in heads]
    assert max(figures.visual_weight[:, layer, head].max() for layer, head in others) > 0.05


def greedy_with_cache(model, inputs, cache, steps: int = 3):
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=steps, min_new_tokens=steps, do_sample=False,
                             output_logits=True, return_dict_in_generate=True,
                             **{generate_cache_keyword(model): cache})
    return out.sequences, torch.stack(out.logits, dim=1)


@pytest.mark.parametrize("family", FAMILIES)
def test_pruned_cache_generates_what_the_masked_eager_reference_generates(loaded, family):
    fast, eager = loaded(family), loaded(family, "eager")
    inputs = padded_batch(fast)
    heads = chosen_heads(fast.model)
    text = fast.model.config.get_text_config()
    n_image = (inputs["input_ids"] == fast.adapter.image_token_id).sum(1)
    for mode in ("image-blind", "flow-blind"):
        with ablate(fast.model, heads, mode=mode) as ctx:
            cache = ctx.cache()
            tokens, logits = greedy_with_cache(fast.model, inputs, cache)
        with MaskedEager(eager, mode, heads):
            ref_tokens, ref_logits = greedy(eager.model, inputs)
        assert torch.equal(tokens, ref_tokens), mode
        torch.testing.assert_close(logits, ref_logits, atol=1e-4, rtol=1e-4, msg=mode)
        assert cache.pruned, "every test family has full-attention layers whose image the cache can drop"
        held = cache_bytes(cache)
        image = (inputs["input_ids"] == fast.adapter.image_token_id) & inputs["attention_mask"].bool()
        plain = DynamicCache(config=fast.model.config)
        with torch.no_grad():
            fast.model.generate(**inputs, max_new_tokens=3, min_new_tokens=3, do_sample=False,
                                **{generate_cache_keyword(fast.model): plain})
        full = cache_bytes(plain, image)
        per_token = 2 * text.head_dim * 4  # keys and values of one key/value head at one position, fp32
        dropped = sum(text.num_key_value_heads - len(cache.layers[layer].keep) for layer in cache.pruned)
        assert full["image"] - held["image"] == per_token * dropped * int(n_image.sum())
        assert held["total"] < full["total"]


def test_recorder_figures_are_the_same_with_the_pruned_cache(loaded):
    fast = loaded("llava")
    inputs = padded_batch(fast)
    heads = chosen_heads(fast.model)
    results = []
    for use_cache in (False, True):
        with torch.no_grad(), ablate(fast.model, heads, mode="image-blind") as ctx, \
                HeadRecorder(fast.model, readout="generated", eos_token_ids=[]) as rec:
            extra = {generate_cache_keyword(fast.model): ctx.cache()} if use_cache else {}
            fast.model.generate(**inputs, max_new_tokens=3, min_new_tokens=3, do_sample=False, **extra)
        results.append(rec.result())
    plain, pruned = results
    for name in ("visual_weight", "text_weight", "sink_weight", "concentration"):
        np.testing.assert_allclose(pruned.values[name], plain.values[name], atol=1e-5, equal_nan=True,
                                   err_msg=name)
    for layer, head in heads:
        np.testing.assert_allclose(pruned.visual_weight[:, layer, head], 0.0, atol=1e-7)


def test_pruned_cache_is_refused_outside_its_context_and_for_other_modes(loaded):
    fast = loaded("llava")
    inputs = padded_batch(fast)
    with ablate(fast.model, [(0, 0), (0, 1)], mode="image-blind") as ctx:
        cache = ctx.cache()
    with pytest.raises(Exception, match="works only inside the ablate"), torch.no_grad():
        fast.model.generate(**inputs, max_new_tokens=2, **{generate_cache_keyword(fast.model): cache})
    with pytest.raises(ValueError, match="image-blind or flow-blind"), ablate(fast.model, [(0, 0)]) as ctx:
        ctx.cache()
    assert generate_cache_keyword(fast.model) in ("cache", "past_key_values")


@pytest.mark.parametrize("family", FAMILIES)
def test_fastv_cache_generates_what_the_masked_eager_reference_generates(loaded, family):
    fast, eager = loaded(family), loaded(family, "eager")
    inputs = padded_batch(fast)
    k = fastv_layer(fast.model)
    with fastv(fast.model, layer=k, keep=0.5) as ctx:
        cache = ctx.cache()
        tokens, logits = greedy_with_cache(fast.model, inputs, cache)
    with MaskedEager(eager, "fastv", layer=k, keep=0.5) as reference:
        ref_tokens, ref_logits = greedy(eager.model, inputs)
    assert torch.equal(tokens, ref_tokens)
    torch.testing.assert_close(logits, ref_logits, atol=1e-4, rtol=1e-4)
    assert cache.pruned and min(cache.pruned) >= k
    text = fast.model.config.get_text_config()
    image = (inputs["input_ids"] == fast.adapter.image_token_id) & inputs["attention_mask"].bool()
    per_token = 2 * text.head_dim * 4 * text.num_key_value_heads
    dropped = int(image.sum()) - sum(reference.kept_counts)
    plain = DynamicCache(config=fast.model.config)
    with torch.no_grad():
        fast.model.generate(**inputs, max_new_tokens=3, min_new_tokens=3, do_sample=False,
                            **{generate_cache_keyword(fast.model): plain})
    assert cache_bytes(plain, image)["image"] - cache_bytes(cache)["image"] == per_token * dropped * len(cache.pruned)


def test_recorder_figures_under_fastv_are_those_of_the_masked_eager_attention(loaded):
    from test_capture import assert_figures_close, eager_rows, reference_figures

    fast, eager = loaded("llava_next"), loaded("llava_next", "eager")
    inputs = padded_batch(fast)
    with torch.no_grad(), fastv(fast.model, layer=1, keep=0.25), HeadRecorder(fast.model) as rec:
        fast.model(**inputs)
    with MaskedEager(eager, "fastv", layer=1, keep=0.25):
        rows = eager_rows(eager, inputs)
    expected = reference_figures(rows, inputs["input_ids"], inputs["attention_mask"], fast.adapter.image_token_id)
    figures = rec.result()
    assert_figures_close(figures, expected)
    with torch.no_grad(), HeadRecorder(fast.model) as plain:
        fast.model(**inputs)
    assert not np.allclose(plain.result().concentration[:, 1:], figures.concentration[:, 1:], equal_nan=True)
