"""Untrusted images: what a client may send, and the one-line reasons for what it may not."""

import base64
import io
import struct
import zlib

import pytest
from PIL import Image

from ligero.errors import LigeroError
from ligero.vision.images import ImageLimits, data_url, decode_image, image_from_url, read_image


def _png(width=32, height=16) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (width, height), (10, 200, 30)).save(buf, format="PNG")
    return buf.getvalue()


def _png_claiming(width: int, height: int) -> bytes:
    """A valid PNG header that claims width x height, with a tiny (wrong) body: a decompression bomb's shape."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\x00" * 16)) + chunk(b"IEND", b""))


def test_a_png_decodes_to_rgb():
    image = decode_image(_png())
    assert image.size == (32, 16) and image.mode == "RGB" and image.getpixel((0, 0)) == (10, 200, 30)


def test_data_url_round_trip():
    image = Image.new("RGB", (20, 10), (1, 2, 3))
    back = image_from_url(data_url(image))
    assert back.size == (20, 10) and back.getpixel((5, 5)) == (1, 2, 3)


@pytest.mark.parametrize("data, reason", [
    (b"", "empty"),
    (b"this is not an image at all", "not an image"),
    (_png()[:60], "truncated"),
    (_png_claiming(30000, 30000), "pixels"),
    (_png_claiming(0, 10), "not an image"),
])
def test_bad_images_are_refused_with_a_reason(data, reason):
    with pytest.raises(LigeroError, match=reason):
        decode_image(data)


def test_limits_on_bytes_and_side():
    with pytest.raises(LigeroError, match="bytes"):
        decode_image(_png(), ImageLimits(max_bytes=50))
    with pytest.raises(LigeroError, match="per side"):
        decode_image(_png(64, 8), ImageLimits(max_side=32))


@pytest.mark.parametrize("url, reason", [
    ("https://example.com/cat.png", "does not fetch"),
    ("http://10.0.0.1/x.png", "does not fetch"),
    ("data:image/png;base64,@@@@", "malformed"),
    ("data:text/plain,hello", "base64 data URL"),
    ("file:///etc/passwd", "base64 data URL"),
])
def test_urls_that_are_refused(url, reason):
    with pytest.raises(LigeroError, match=reason):
        image_from_url(url)


def test_a_base64_payload_that_is_not_an_image():
    url = "data:image/png;base64," + base64.b64encode(b"GIF89a-but-not-really").decode()
    with pytest.raises(LigeroError, match="not an image"):
        image_from_url(url)


def test_read_image_names_a_missing_file(tmp_path):
    with pytest.raises(LigeroError, match="not found"):
        read_image(tmp_path / "nope.png")
