"""Reading untrusted images: bytes or a file become an RGB Pillow image, or a LigeroError saying what is wrong.

The limits are checked before pixels are decoded (Pillow reads the header first), so a small file that claims huge
dimensions (a decompression bomb) is refused without allocating its pixels.
"""

from __future__ import annotations

import base64
import binascii
import io
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from ligero.errors import LigeroError


@dataclass(frozen=True)
class ImageLimits:
    max_bytes: int = 8 << 20  # encoded size
    max_pixels: int = 16_000_000  # width x height
    max_side: int = 8192
    max_images: int = 4  # per prompt or request

    def __post_init__(self) -> None:
        if min(self.max_bytes, self.max_pixels, self.max_side, self.max_images) < 1:
            raise LigeroError("image limits must be positive")


DEFAULT_LIMITS = ImageLimits()
DATA_URL = re.compile(r"data:(image/[a-z0-9.+-]+)?(;[a-z0-9=.-]+)*;base64,(.*)", re.IGNORECASE | re.DOTALL)


def decode_image(data: bytes, limits: ImageLimits = DEFAULT_LIMITS, name: str = "the image") -> Image.Image:
    """An RGB image from encoded bytes (PNG, JPEG, GIF, WebP, BMP...); LigeroError for empty, oversized, truncated,
    unreadable or too large images."""
    if not data:
        raise LigeroError(f"{name} is empty (0 bytes); send a PNG or JPEG file")
    if len(data) > limits.max_bytes:
        raise LigeroError(f"{name} is {len(data):,} bytes; the limit is {limits.max_bytes:,}: send a smaller file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            width, height = image.size
            if width < 1 or height < 1:
                raise LigeroError(f"{name} has zero size ({width}x{height})")
            if max(width, height) > limits.max_side or width * height > limits.max_pixels:
                raise LigeroError(f"{name} is {width}x{height} pixels; the limits are {limits.max_side} per side and "
                                  f"{limits.max_pixels:,} in all: resize it")
            image.load()  # decodes now: a truncated file fails here, not later
            return image.convert("RGB")
    except LigeroError:
        raise
    except (Image.DecompressionBombWarning, Image.DecompressionBombError):
        raise LigeroError(f"{name} claims more pixels than Ligero decodes (limit {limits.max_pixels:,}): resize it") \
            from None
    except UnidentifiedImageError:
        raise LigeroError(f"{name} is not an image Ligero can read; send a PNG, JPEG, GIF, WebP or BMP file") from None
    except (OSError, SyntaxError, ValueError) as e:  # truncated or corrupt pixel data
        raise LigeroError(f"{name} is truncated or corrupt ({e}); send the whole file") from None


def read_image(path: str | Path, limits: ImageLimits = DEFAULT_LIMITS) -> Image.Image:
    path = Path(path)
    if not path.is_file():
        raise LigeroError(f"image file {path} not found; pass an existing PNG or JPEG file")
    if path.stat().st_size > limits.max_bytes:
        raise LigeroError(f"{path} is {path.stat().st_size:,} bytes; the limit is {limits.max_bytes:,}")
    return decode_image(path.read_bytes(), limits, name=str(path))


def image_from_url(url: str, limits: ImageLimits = DEFAULT_LIMITS, name: str = "the image") -> Image.Image:
    """An image from a `data:image/...;base64,...` URL. Network URLs are refused: Ligero never fetches."""
    if re.match(r"(https?|ftp)://", url, re.IGNORECASE):
        raise LigeroError(f"{name} is a network URL; Ligero does not fetch images: send it inline as "
                          "data:image/png;base64,...")
    m = DATA_URL.fullmatch(url.strip())
    if not m:
        raise LigeroError(f"{name} is not a base64 data URL; send data:image/png;base64,... (or image/jpeg)")
    payload = m.group(3)
    if len(payload) * 3 // 4 > limits.max_bytes + 3:
        raise LigeroError(f"{name} is over {limits.max_bytes:,} bytes; send a smaller image")
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise LigeroError(f"{name}'s base64 data is malformed; encode the file with standard base64") from None
    return decode_image(data, limits, name)


def data_url(image: Image.Image, fmt: str = "PNG") -> str:
    """The image as a data URL (what a client sends)."""
    buf = io.BytesIO()
    image.save(buf, format=fmt)
    return f"data:image/{fmt.lower()};base64,{base64.b64encode(buf.getvalue()).decode()}"
