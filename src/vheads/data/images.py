"""Image sources: a cheap check at load time (header, base64) and a lazy RGB open at run time.

PIL can raise almost anything on hostile bytes, so both steps turn every decoder error into
`BadRecord` (a `BadSample`): one bad image costs one sample, never the run.
"""

from __future__ import annotations

import base64
import binascii
import io
from pathlib import Path

from PIL import Image

from vheads.data.skips import BAD_BASE64, CORRUPT_IMAGE, MISSING_IMAGE, BadRecord
from vheads.data.visual_prompt import Box, draw_box


def _probe(opener: object, what: str) -> tuple[int, int]:
    """Open an image without decoding its pixels, verify its structure, and return its size."""
    try:
        with Image.open(opener) as image:  # type: ignore[arg-type]
            size = image.size
            image.verify()
    except Exception as error:
        raise BadRecord(CORRUPT_IMAGE, f"{what}: {error.__class__.__name__}") from None
    if size[0] < 1 or size[1] < 1:
        raise BadRecord(CORRUPT_IMAGE, f"{what}: empty image")
    return size


def probe_file(path: Path) -> tuple[int, int]:
    """Size of an image file, after checking that it exists and its header is sound."""
    if not path.is_file():
        raise BadRecord(MISSING_IMAGE, str(path))
    return _probe(path, str(path))


def probe_bytes(data: bytes) -> tuple[int, int]:
    """Size of an image held in memory, after checking its header."""
    return _probe(io.BytesIO(data), "image bytes")


def decode_base64(text: str) -> bytes:
    """Bytes of a base64 image string; `BadRecord` if it is not valid base64 or is empty."""
    try:
        data = base64.b64decode("".join(text.split()), validate=True)
    except (binascii.Error, ValueError):
        raise BadRecord(BAD_BASE64, "not valid base64") from None
    if not data:
        raise BadRecord(BAD_BASE64, "empty")
    return data


def _open(opener: object, what: str, box: Box | None) -> Image.Image:
    """Decode to RGB, draw the box when given, and turn decoder errors into `BadRecord`."""
    try:
        with Image.open(opener) as image:  # type: ignore[arg-type]
            rgb = image.convert("RGB")
    except FileNotFoundError:
        raise BadRecord(MISSING_IMAGE, what) from None
    except Exception as error:
        raise BadRecord(CORRUPT_IMAGE, f"{what}: {error.__class__.__name__}") from None
    return draw_box(rgb, box) if box is not None else rgb


def open_file(path: Path, box: Box | None = None) -> Image.Image:
    """The RGB image in `path`, with the visual-prompt box drawn on it when `box` is given."""
    return _open(path, str(path), box)


def open_bytes(data: bytes, box: Box | None = None) -> Image.Image:
    """The RGB image encoded in `data`, with the box drawn when given."""
    return _open(io.BytesIO(data), "image bytes", box)


def open_base64(text: str, box: Box | None = None) -> Image.Image:
    """The RGB image in a base64 string, with the box drawn when given."""
    return open_bytes(decode_base64(text), box)


def open_pil(image: Image.Image, box: Box | None = None) -> Image.Image:
    """An in-memory PIL image as RGB, with the box drawn when given."""
    try:
        rgb = image.convert("RGB")
    except Exception as error:
        raise BadRecord(CORRUPT_IMAGE, f"in-memory image: {error.__class__.__name__}") from None
    return draw_box(rgb, box) if box is not None else rgb
