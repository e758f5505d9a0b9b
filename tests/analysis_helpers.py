"""Synthetic runs written straight into a store, so analyses are tested on head figures chosen by hand."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from vheads.store import Store


def synthetic_run(store: Store, name: str, w: np.ndarray, c: np.ndarray | None = None,
                  correct: Sequence[bool] | None = None, model: str = "model-a", dataset: str = "shapes",
                  question_types: Sequence[str] | None = None, prompt_styles: Sequence[str] | None = None) -> str:
    """Store a finished run whose W (and C) per [sample, layer, head] are exactly the given arrays."""
    n, layers, heads = w.shape
    c = np.full_like(w, 0.5) if c is None else c
    handle = store.start_run(name, model=model, family="llava", dataset=dataset, split="test", layers=layers,
                             heads=heads, readout="prompt", ablation="none", config={})
    rows = [{"sample_id": f"s{i:03d}", "question_type": question_types[i] if question_types else "general",
             "prompt_style": prompt_styles[i] if prompt_styles else "visual", "answer": "1",
             "prediction": "1", "correct": None if correct is None else bool(correct[i])} for i in range(n)]
    store.add_batch(handle, rows, w, c, None, None, None)
    accuracy = None if correct is None else float(np.mean(correct))
    store.finish_run(handle, "done", accuracy=accuracy)
    return name
