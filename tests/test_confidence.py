"""The answer's confidence stored with every sample equals the softmax of a plain forward's logits at the answer
positions, in left-padded batches, with answers cut at their end-of-sequence token."""

from __future__ import annotations

import duckdb
import numpy as np
import pytest
import torch

from vheads.data import load_dataset
from vheads.models import load
from vheads.pipeline.batches import answer_confidence
from vheads.pipeline.config import RunConfig
from vheads.pipeline.run import run
from vheads.store import Store


@pytest.fixture(scope="module")
def llava(model_dirs):
    return load(model_dirs("llava"), dtype="float32", device="cpu")


def plain_generate(loaded, samples, max_new_tokens):
    """Prompt ids, attention mask and greedy answer tokens of one left-padded batch, without capture."""
    adapter = loaded.adapter
    inputs = adapter.encode([adapter.prompt(s.text) for s in samples], [[s.image()] for s in samples])
    with torch.inference_mode():
        out = loaded.model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False,
                                    pad_token_id=adapter.tokenizer.pad_token_id)
    prompt_len = inputs["input_ids"].shape[1]
    return inputs, out[:, prompt_len:]


def reference(loaded, inputs, tokens, eos):
    """First-token probability and mean log-probability up to and including the first EOS, from one plain forward
    over prompt + answer (position ids follow the left padding, as generate's do)."""
    ids = torch.cat([inputs["input_ids"], tokens], dim=1)
    mask = torch.cat([inputs["attention_mask"], torch.ones_like(tokens)], dim=1)
    positions = (mask.cumsum(1) - 1).clamp(min=0)
    with torch.inference_mode():
        logits = loaded.model(input_ids=ids, attention_mask=mask, position_ids=positions,
                              pixel_values=inputs["pixel_values"]).logits.float()
    prompt_len = inputs["input_ids"].shape[1]
    probs = torch.softmax(logits[:, prompt_len - 1:-1], dim=-1).gather(2, tokens[:, :, None])[:, :, 0].numpy()
    first, mean = [], []
    for row, p in zip(tokens.numpy(), probs, strict=True):
        hits = np.flatnonzero(np.isin(row, eos))
        n = hits[0] + 1 if len(hits) else len(row)
        first.append(p[0])
        mean.append(np.log(p[:n]).mean())
    return np.array(first), np.array(mean), [len(r) if not np.isin(r, eos).any() else
                                            int(np.flatnonzero(np.isin(r, eos))[0]) + 1 for r in tokens.numpy()]


def stored(path, name):
    with Store(path, read_only=True) as db:
        return db.samples(name).set_index("sample_id")


def test_stored_confidence_equals_a_plain_forward_in_left_padded_batches(tmp_path, llava):
    config = RunConfig(limit=8, batch_size=4, max_new_tokens=5, store=str(tmp_path / "s.duckdb"), name="r")
    samples = load_dataset(config.dataset, limit=8, seed=config.seed).samples
    model = llava.model
    old_eos = model.generation_config.eos_token_id
    # Make the answers end early: the token the model most often writes second becomes end-of-sequence.
    _, probe = plain_generate(llava, samples[:4], 5)
    eos = int(torch.mode(probe[:, 1]).values)
    model.generation_config.eos_token_id = eos
    try:
        run(config, loaded=llava)
        rows = stored(tmp_path / "s.duckdb", "r")
        lengths = []
        for batch in (samples[:4], samples[4:]):
            inputs, tokens = plain_generate(llava, batch, 5)
            assert (inputs["attention_mask"] == 0).any(), "the batch should be left-padded"
            first, mean, n = reference(llava, inputs, tokens, [eos])
            lengths += n
            got = rows.loc[[s.id for s in batch]]
            assert list(got["prediction"]) == llava.adapter.decode(tokens, 0)
            np.testing.assert_allclose(got["first_token_prob"].to_numpy(float), first, atol=1e-4, rtol=0)
            np.testing.assert_allclose(got["mean_logprob"].to_numpy(float), mean, atol=1e-4, rtol=0)
        assert min(lengths) < 5 and max(lengths) > 1, "some answers should end at the EOS, some run longer"
    finally:
        model.generation_config.eos_token_id = old_eos


def test_answer_tokens_run_up_to_and_including_the_first_eos():
    logits = [torch.log(torch.tensor([[0.5, 0.25, 0.25], [0.1, 0.1, 0.8]])) for _ in range(3)]
    tokens = torch.tensor([[0, 2, 1], [2, 2, 2]])
    sure = answer_confidence(logits, tokens, eos=[2])
    np.testing.assert_allclose(sure.first_token_prob, [0.5, 0.8])
    np.testing.assert_allclose(sure.mean_logprob, [np.log([0.5, 0.25]).mean(), np.log(0.8)])
    none = answer_confidence(logits, tokens, eos=[])
    np.testing.assert_allclose(none.mean_logprob[0], np.log([0.5, 0.25, 0.25]).mean())


def test_old_stores_gain_the_confidence_columns_empty(tmp_path):
    path = tmp_path / "old.duckdb"
    con = duckdb.connect(str(path))
    con.execute("CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT)")
    con.execute("INSERT INTO meta VALUES ('schema_version', '1')")
    con.execute("CREATE TABLE samples (run_id INTEGER NOT NULL, sample_id TEXT NOT NULL, correct BOOLEAN)")
    con.execute("INSERT INTO samples VALUES (1, 'a', true)")
    con.close()
    with Store(path) as db:
        frame = db.query("SELECT first_token_prob, mean_logprob FROM samples")
    assert frame.isna().all().all() and len(frame) == 1
