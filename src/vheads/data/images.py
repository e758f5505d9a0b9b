"""Image sources: a cheap check at load time (header, base64, pixel cap) and a lazy RGB open at run time.

PIL can raise almost anything on hostile bytes, so both steps turn every decoder error into
`BadRecord` (a `BadSample`): one bad image costs one sample, never the run.
"""

from __future__ import annotations

import base64
import binascii
import io
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path

import numpy as np
from PIL import Image

from vheads.data.skips import BAD_BASE64, CORRUPT_IMAGE, MISSING_IMAGE, TOO_LARGE, BadRecord
from vheads.data.visual_prompt import Box, draw_box

DEFAULT_MAX_PIXELS = 50_000_000
"""Images with more pixels than this (read from the header) are skipped: 50 MP is 150 MB as RGB."""

_MAX_PIXELS: ContextVar[int | None] = ContextVar("vheads_max_pixels", default=DEFAULT_MAX_PIXELS)


@contextmanager
def pixel_cap(max_pixels: int | None) -> Iterator[None]:
    """Within the block, probes skip images with more than `max_pixels` pixels (None: no cap)."""
    token = _MAX_PIXELS.set(max_pixels)
    try:
        yield
    finally:
        _MAX_PIXELS.reset(token)


def _probe(opener: object, what: str) -> tuple[int, int]:
    """Open an image without decoding its pixels, verify its structure and the pixel cap, and return its size."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(opener) as image:  # type: ignore[arg-type]
                size = image.size
                image.verify()
    except Image.DecompressionBombError:
        raise BadRecord(TOO_LARGE, f"{what}: over PIL's decompression-bomb limit") from None
    except Exception as error:
        raise BadRecord(CORRUPT_IMAGE, f"{what}: {error.__class__.__name__}") from None
    if size[0] < 1 or size[1] < 1:
        raise BadRecord(CORRUPT_IMAGE, f"{what}: empty image")
    cap = _MAX_PIXELS.get()
    if cap is not None and size[0] * size[1] > cap:
        raise BadRecord(TOO_LARGE, f"{what}: {size[0]}x{size[1]} is over {cap:,} pixels (--max-pixels)")
    return size


def to_rgb(image: Image.Image) -> Image.Image:
    """`image` as 8-bit RGB; 16-bit and 32-bit integer grayscale is scaled down by its bit depth, float by its range.

    PIL's own `convert("RGB")` clips such images at 255, which turns a 16-bit photo almost white.
    """
    if image.mode.startswith("I;16"):
        values = np.asarray(image).astype(np.float64) / 257.0
    elif image.mode == "I":
        values = np.asarray(image).astype(np.float64)
        top = float(values.max(initial=0))
        values = values / 257.0 if top > 255 and top <= 65535 else _stretch(values) if top > 255 else values
    elif image.mode == "F":
        values = np.asarray(image).astype(np.float64)
        finite = values[np.isfinite(values)]
        in_unit = finite.size and finite.min() >= 0 and finite.max() <= 1
        values = np.nan_to_num(values * 255.0 if in_unit else _stretch(values))
    else:
        return image.convert("RGB")
    return Image.fromarray(np.clip(np.rint(values), 0, 255).astype(np.uint8), mode="L").convert("RGB")


def _stretch(values: np.ndarray) -> np.ndarray:
    """Values mapped linearly from their finite [min, max] to [0, 255] (all 0 when constant)."""
    finite = values[np.isfinite(values)]
    if not finite.size or finite.max() == finite.min():
        return np.zeros_like(values)
    return (values - finite.min()) * (255.0 / (finite.max() - finite.min()))


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
            rgb = to_rgb(image)
    except FileNotFoundError:
        raise BadRecord(MISSING_IMAGE, what) from None
    except Image.DecompressionBombError:
        raise BadRecord(TOO_LARGE, f"{what}: over PIL's decompression-bomb limit") from None
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
        rgb = to_rgb(image)
    except Exception as error:
        raise BadRecord(CORRUPT_IMAGE, f"in-memory image: {error.__class__.__name__}") from None
    return draw_box(rgb, box) if box is not None else rgb
