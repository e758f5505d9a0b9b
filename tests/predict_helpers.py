"""Synthetic stored runs for the prediction tests: no model, rows written through `Store.add_batch`.

Heads 0.0 and 0.1 look at the image (W 0.3-0.9, so they are the visual heads: K = 2 of 24); the rest do not
(W < 0.2). A sample's
chance of a right answer rises with the W of head 0.0 (`signal`), and so does its first-token probability; half the
samples have no box (region weight and pointing NULL) and some concentrations are NULL.
"""

from __future__ import annotations

import numpy as np

from vheads.store import Store

LAYERS, HEADS = 3, 8


def add_run(db: Store, name: str, n: int, seed: int = 0, signal: float = 6.0, shift: float = 0.0,
            confident: bool = True, image_of=None) -> np.ndarray:
    """Store a finished run of `n` synthetic samples; returns its correct flags. `shift` moves every W of head 0.0
    (and so the accuracy); `image_of(i)` names sample i's image (meta `image`), default one image per sample."""
    rng = np.random.default_rng(seed)
    w = rng.uniform(0.0, 0.2, size=(n, LAYERS, HEADS))
    w[:, 0, :2] = rng.uniform(0.3, 0.9, size=(n, 2))
    w[:, 0, 0] = np.clip(w[:, 0, 0] + shift, 0.0, 1.0)
    c = rng.uniform(0.0, 1.0, size=w.shape)
    c[rng.random(w.shape) < 0.05] = np.nan
    boxed = rng.random(n) < 0.5
    region = np.where(boxed[:, None, None], w * rng.uniform(0, 1, size=w.shape), np.nan)
    pointing = np.where(boxed[:, None, None], (rng.random(w.shape) < 0.5).astype(float), np.nan)
    p_right = 1 / (1 + np.exp(-signal * (w[:, 0, 0] - 0.6)))
    correct = rng.random(n) < p_right
    first = np.clip(0.5 + 0.3 * (p_right - 0.5) + rng.normal(0, 0.15, n), 0.01, 0.99)
    run = db.start_run(name, model="synthetic", family="llava", dataset="shapes", split="test", layers=LAYERS,
                       heads=HEADS, readout="prompt", ablation="none", config={})
    rows = [{"sample_id": f"s{i:05d}", "question": f"how many <script>alert(1)</script> & co #{i}?", "prediction": "2",
             "answer": "2" if correct[i] else "3", "correct": bool(correct[i]), "question_type": "general",
             "prompt_style": "none", "image_tokens": 36, "region_tokens": 4,
             "meta": {"image": image_of(i)} if image_of else {},
             "first_token_prob": float(first[i]) if confident else None,
             "mean_logprob": float(np.log(first[i])) if confident else None} for i in range(n)]
    db.add_batch(run, rows, w, c, region, 1 - w, np.zeros_like(w), pointing=pointing)
    db.finish_run(run, accuracy=float(correct.mean()))
    return correct
