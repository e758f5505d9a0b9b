"""Models: loading, per-family prompts and image-token geometry, the bundled demo model."""

from vheads.models.families import FAMILIES, Adapter, ModelError, adapter_for, image_token_id
from vheads.models.geometry import GeometryError, TokenGrid
from vheads.models.loading import Loaded, check_device, demo_path, load

__all__ = [
    "FAMILIES",
    "Adapter",
    "GeometryError",
    "Loaded",
    "ModelError",
    "TokenGrid",
    "adapter_for",
    "check_device",
    "demo_path",
    "image_token_id",
    "load",
]
