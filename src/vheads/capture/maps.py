"""`TokenMaps`: each head's attention to the image tokens of a batch, for the figures read off the whole map.

`HeadRecorder` reduces most figures to sums over key masks; pointing (is the most-attended image token a target?)
and spatial entropy (how many regions does the attention above the mean form on the patch grid?) need the map
itself, so the recorder gathers each layer's attention to the image tokens and finishes these two figures once
per step for all layers.
"""

from __future__ import annotations

import numpy as np
import torch

from vheads import metrics
from vheads.models.geometry import TokenGrid

MAP_FIGURES = ("pointing", "spatial_entropy")


class TokenMaps:
    """Where a group's image tokens sit in the prompt, for the figures read off each head's map over them: which
    are targets (pointing) and how they lie on their patch grids (spatial entropy). Inactive without either."""

    def __init__(self, image: torch.Tensor, counts: torch.Tensor, target: torch.Tensor | None,
                 grids: list[TokenGrid | None] | None):
        usable = grids is not None and any(g is not None for g in grids)
        self.active = target is not None or usable
        if not self.active:
            return
        n = max(1, int(counts.max())) if counts.numel() else 1
        self.positions = torch.argsort((~image).to(torch.int8), dim=1, stable=True)[:, :n]
        self.valid = torch.arange(n, device=image.device)[None, :] < counts[:, None]
        self.target = None if target is None else target.gather(1, self.positions) & self.valid
        self.has_target = (torch.zeros_like(counts, dtype=torch.bool) if self.target is None
                           else self.target.any(dim=1))
        self._index: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}
        self.layouts: dict[bytes, tuple[list[int], TokenGrid]] = {}
        for row, grid in enumerate(grids if usable else []):
            if grid is not None and len(grid) == int(counts[row]):
                key = grid.tile.tobytes() + grid.row.tobytes() + grid.col.tobytes()
                self.layouts.setdefault(key, ([], grid))[0].append(row)

    def gather(self, probs: torch.Tensor, kv_offset: int) -> torch.Tensor:
        """The attention [batch, heads, n] of each row's image tokens, in token order (0 for padding slots).

        The index is built once per key offset, head count and device, not once per layer."""
        key = (kv_offset, probs.shape[1], probs.device)
        if key not in self._index:
            index = (self.positions - kv_offset).clamp(min=0)[:, None, :].expand(-1, probs.shape[1], -1)
            ok = (self.valid & (self.positions >= kv_offset))[:, None, :]
            self._index = {key: (index.contiguous().to(probs.device), ok.to(probs.device, probs.dtype))}
        index, ok = self._index[key]
        return torch.gather(probs, 2, index) * ok

    def figures(self, maps: torch.Tensor) -> torch.Tensor:
        """Pointing and spatial entropy [batch, layers, heads, 2] from image-token maps [batch, layers, heads, n]."""
        out = torch.full((*maps.shape[:-1], len(MAP_FIGURES)), float("nan"), dtype=maps.dtype, device=maps.device)
        if self.target is not None:
            valid = self.valid.to(maps.device)[:, None, None, :]
            hit = metrics.pointing(maps, valid, self.target.to(maps.device)[:, None, None, :])
            out[..., 0] = hit.masked_fill(~self.has_target.to(maps.device)[:, None, None], float("nan"))
        if self.layouts:
            values = maps.float().cpu().numpy()
            entropy = np.full(values.shape[:-1], np.nan)
            for rows, grid in self.layouts.values():
                entropy[rows] = metrics.spatial_entropy(values[rows][..., : len(grid)], grid.tile, grid.row, grid.col)
            out[..., 1] = torch.from_numpy(entropy).to(out)
        return out
