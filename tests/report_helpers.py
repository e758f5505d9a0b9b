"""Synthetic stores for report tests: runs of any layers x heads with planted visual heads and hostile text."""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from vheads.store import Store

HOSTILE = "<script>alert(1)</script>"
EXTERNAL = re.compile(r"""(?:src|href)\s*=\s*["']?\s*(?:https?:)?//|url\(\s*["']?(?:https?:)?//|@import""", re.I)


def synthetic_run(store: Store, name: str, layers: int, heads: int, planted: Sequence[tuple[int, int]],
                  n: int = 12, seed: int = 0, model: str = "/nonexistent/vheads-test-model", curve: str | None = None,
                  tags: dict | None = None, correct: Sequence[bool] | None = None) -> str:
    """A finished run whose planted heads look at the image in every sample; questions carry a script tag."""
    rng = np.random.default_rng(seed)
    w = rng.uniform(0.0, 0.2, (n, layers, heads))
    for layer, head in planted:
        w[:, layer, head] = rng.uniform(0.6, 0.9, n)
    c = rng.uniform(0.2, 0.9, (n, layers, heads))
    correct = [i % 3 != 0 for i in range(n)] if correct is None else list(correct)
    handle = store.start_run(name, model=model, family="llava", dataset="shapes", split="test", layers=layers,
                             heads=heads, readout="prompt", ablation="none", config={"dataset": "shapes"},
                             curve=curve, tags=tags)
    rows = [{"sample_id": f"s{i:03d}", "question": f"How many {HOSTILE} are there?", "answer": "3",
             "prediction": "<b>3</b>", "correct": ok, "meta": {"box": [4, 4, 20, 20]}}
            for i, ok in enumerate(correct)]
    store.add_batch(handle, rows, w, c, w * 0.3, 1 - w, None)
    store.finish_run(handle, "done", accuracy=float(np.mean(correct)))
    return name


def synthetic_curve(store: Store, from_run: str, layers: int, heads: int, n: int = 12) -> str:
    """Curve points ablating `from_run`: a baseline, top and late at K = 4, random at K = 4 with two seeds."""
    tag = f"ablate-{from_run}-zero-test"
    points = [("none", 0, None, 0.9), ("top", 4, None, 0.3), ("late", 4, None, 0.85), ("random", 4, 0, 0.8),
              ("random", 4, 1, 0.7)]
    for i, (selector, k, seed, accuracy) in enumerate(points):
        correct = [j < round(accuracy * n) for j in range(n)]
        tags = {"selector": selector, "k": k, "seed": seed, "from_run": from_run,
                "heads": [f"{layers - 1}.{h}" for h in range(k)]}
        synthetic_run(store, f"{tag}-{i}", layers, heads, [], n=n, seed=10 + i, curve=tag, tags=tags,
                      correct=correct)
    return tag


def spread(path: Path) -> float:
    """Standard deviation of an image's grey levels (0 for a blank picture)."""
    return float(np.asarray(Image.open(path).convert("L"), dtype=np.float64).std())
