"""Shared fixtures: tiny models saved once per test session and loaded through `vheads.models.load`."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

from tiny_models import BUILDERS  # noqa: E402

# One torch thread: the tiny models gain nothing from a second one, and on a busy (shared or CI) machine two threads
# wait on each other (the suite ran about a third slower on 2 than on 1 on a loaded 2-core machine).
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def model_dirs(tmp_path_factory: pytest.TempPathFactory):
    """A function family -> saved tiny model folder, built on first use."""
    cache: dict[str, Path] = {}

    def get(family: str) -> Path:
        if family not in cache:
            cache[family] = BUILDERS[family](tmp_path_factory.mktemp(family))
        return cache[family]

    return get
