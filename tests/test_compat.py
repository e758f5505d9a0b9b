"""vheads reads transformers through `vheads.compat`, under every name a supported release uses.

transformers 5.24 renamed the forward's `past_key_values` to `cache` (the old name stays a deprecated alias until
5.40); `generate` passes the new name, older code the old one. A recorder must tell prefill from decode under both,
or every decode step looks like a new prompt.
"""

from __future__ import annotations

import ast
import inspect
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import DynamicCache

import vheads
from vheads.capture import HeadRecorder
from vheads.compat import CACHE_ARGUMENTS, forward_cache
from vheads.models import load

STEPS = 4


def scene(seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8))


def accepted_cache_argument(model: torch.nn.Module) -> str:
    """The name under which this release's forward takes the cache as a declared parameter."""
    parameters = inspect.signature(model.forward).parameters
    return next(name for name in CACHE_ARGUMENTS if name in parameters)


def greedy_by_hand(model, inputs: dict, name: str) -> torch.Tensor:
    """`STEPS` greedy tokens from a decode loop that hands the cache to the model under `name`.

    Where the installed release does not declare `name`, a pre-hook registered after the recorder's moves it to
    the declared one: the recorder sees the caller's name, the forward the name it takes."""
    accepted = accepted_cache_argument(model)

    def rename(module, args, kwargs):
        if name != accepted and name in kwargs:
            kwargs[accepted] = kwargs.pop(name)
        return args, kwargs

    hook = model.register_forward_pre_hook(rename, with_kwargs=True)
    try:
        cache = DynamicCache(config=model.config.get_text_config(decoder=True))
        step = dict(inputs)
        tokens = []
        for _ in range(STEPS):
            out = model(**step, use_cache=True, **{name: cache})
            token = out.logits[:, -1].argmax(-1, keepdim=True)
            tokens.append(token)
            mask = torch.cat([step["attention_mask"], torch.ones_like(token)], dim=1)
            step = {"input_ids": token, "attention_mask": mask}
        return torch.cat(tokens, dim=1)
    finally:
        hook.remove()


def test_forward_cache_reads_either_name():
    cache = DynamicCache()
    assert forward_cache({"cache": cache}) is cache
    assert forward_cache({"past_key_values": cache}) is cache
    assert forward_cache({"cache": None, "past_key_values": cache}) is cache
    assert forward_cache({"input_ids": 1}) is None


@pytest.mark.parametrize("name", CACHE_ARGUMENTS)
@pytest.mark.parametrize("readout", ["first-generated", "generated"])
def test_decode_steps_are_read_as_decode_under_either_cache_name(model_dirs, name, readout):
    loaded = load(model_dirs("llava"))
    images = [[scene(1)], [scene(2)]]
    prompts = [loaded.adapter.prompt("How many shapes?")] * 2
    inputs = dict(loaded.adapter.encode(prompts, images))
    prompt_len = inputs["input_ids"].shape[1]
    with torch.no_grad(), HeadRecorder(loaded.model, readout=readout) as rec:
        generated = loaded.model.generate(**inputs, max_new_tokens=STEPS, do_sample=False)
    expected = rec.result()
    with torch.no_grad(), HeadRecorder(loaded.model, readout=readout) as rec:
        tokens = greedy_by_hand(loaded.model, inputs, name)
    got = rec.result()
    assert torch.equal(tokens, generated[:, prompt_len:])
    steps = 1 if readout == "first-generated" else STEPS
    assert list(got.readout_steps) == list(expected.readout_steps) == [steps, steps]
    assert not np.isnan(got.visual_weight).any()
    for figure in ("visual_weight", "concentration", "text_weight", "sink_weight"):
        np.testing.assert_allclose(getattr(got, figure), getattr(expected, figure), atol=1e-5, err_msg=figure)


def test_only_the_compat_module_reaches_into_transformers_internals():
    """Private names of transformers (`_global_mapping`, `_attn_implementation`, `_raise_exceptions_*`) and its
    non-top-level modules are used in `vheads.compat` alone, so an upstream rename is mended in one file."""
    root = Path(vheads.__file__).parent
    offenders = []
    for path in sorted(root.rglob("*.py")):
        if path.name == "compat.py" and path.parent == root:
            continue
        text = path.read_text()
        tree = ast.parse(text)
        for node in ast.walk(tree):
            deep = isinstance(node, ast.ImportFrom) and (node.module or "").startswith("transformers.") \
                and [alias.name for alias in node.names] != ["logging"]
            private = isinstance(node, ast.Attribute) and node.attr in {"_global_mapping", "_attn_implementation"}
            if deep or private:
                offenders.append(f"{path.relative_to(root)}:{node.lineno}")
    assert offenders == []
