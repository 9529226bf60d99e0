"""`ligero serve --vision ADAPTER`: chat requests with images in OpenAI's content-part format, through the official
client and a real server process; bad images get a 400 with the reason, never a 500, and the server keeps serving.

The adapter here is an untrained projector (what it answers is not checked, only that the image went in); what the
shipped, trained adapter answers is tested in tests/vision/test_shipped_adapter.py."""

from __future__ import annotations

import base64
import io
import struct
import zlib
from types import SimpleNamespace

import httpx
import openai
import pytest
import torch
from PIL import Image

from ligero.serve.store import Store
from ligero.vision.anyres import GRIDS
from ligero.vision.images import data_url
from ligero.vision.model import TOKENS_PER_VIEW, Projector
from ligero.vision.pretrained import save_adapter

MODEL = "smollm2-135m-vision"


@pytest.fixture(scope="module")
def vision_server(launch, tmp_path_factory):
    folder = tmp_path_factory.mktemp("vision-adapter")
    torch.manual_seed(0)
    fake = SimpleNamespace(projector=Projector(576), lm=torch.nn.Module(), grids=GRIDS, system_prompt="Answer briefly.")
    save_adapter(fake, folder / "adapter", {"base_model": {"id": "smollm2-135m", "sha256": None}})
    store = f"sqlite:///{folder / 'serve.db'}"
    server = launch("--vision", str(folder / "adapter"), "--variant", "fp32", "--variant", "int8",
                    "--store", store, "--max-batch", "4")
    return server, store


def _chart() -> Image.Image:
    image = Image.new("RGB", (448, 224), "white")
    image.paste((200, 30, 30), (40, 60, 120, 224))
    image.paste((30, 30, 200), (300, 120, 380, 224))
    return image


def test_the_official_client_sends_a_base64_image(vision_server):
    server, store = vision_server
    client = openai.OpenAI(base_url=server.base_url, api_key="unused", max_retries=0, timeout=120)
    image_part = {"type": "image_url", "image_url": {"url": data_url(_chart())}}
    raw = client.chat.completions.with_raw_response.create(
        model=f"{MODEL}:int8", max_tokens=5, temperature=0,
        messages=[{"role": "user", "content": [image_part, {"type": "text", "text": "Which bar is highest?"}]}])
    answer = raw.parse()
    assert answer.model == f"{MODEL}:int8" and answer.choices[0].message.content.strip()
    text_only = client.chat.completions.create(
        model=f"{MODEL}:int8", max_tokens=5, temperature=0,
        messages=[{"role": "user", "content": "Which bar is highest?"}])
    # A 448 x 224 image is a global view and two tiles: 3 x 49 image positions in the prompt.
    assert answer.usage.prompt_tokens - text_only.usage.prompt_tokens >= 3 * TOKENS_PER_VIEW
    chunks = list(client.chat.completions.create(
        model=f"{MODEL}:fp32", max_tokens=4, temperature=0, stream=True,
        messages=[{"role": "user", "content": [image_part, image_part, {"type": "text", "text": "Same?"}]}]))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices).strip()
    client.close()
    with Store(store) as s:
        assert s.get_request(raw.headers["x-ligero-request-id"]).prompt_tokens == answer.usage.prompt_tokens


def _png_claiming(width: int, height: int) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\x00" * 16)) + chunk(b"IEND", b""))


def _b64(data: bytes, kind: str = "png") -> str:
    return f"data:image/{kind};base64,{base64.b64encode(data).decode()}"


def _png_bytes() -> bytes:
    buf = io.BytesIO()
    _chart().save(buf, format="PNG")
    return buf.getvalue()


BAD_IMAGES = [
    ("not-an-image", _b64(b"hello, I am text"), "invalid_image", "not an image"),
    ("truncated", _b64(_png_bytes()[:200]), "invalid_image", "truncated"),
    ("zero-size", _b64(b""), "invalid_image", "empty"),
    ("huge-dimensions", _b64(_png_claiming(40000, 40000)), "invalid_image", "pixels"),
    ("network-url", "https://example.com/cat.png", "invalid_image", "does not fetch"),
    ("bad-base64", "data:image/png;base64,!!!notbase64", "invalid_image", "malformed"),
]


@pytest.mark.parametrize("name, url, code, reason", BAD_IMAGES, ids=[b[0] for b in BAD_IMAGES])
def test_bad_images_get_a_400_with_the_reason(vision_server, name, url, code, reason):
    server, _ = vision_server
    r = httpx.post(f"{server.base_url}/chat/completions", timeout=60, json={
        "model": MODEL, "max_tokens": 2,
        "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                                  {"type": "text", "text": "What is this?"}]}]})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["code"] == code and reason in error["message"], error


def test_too_many_images_and_images_outside_user_messages(vision_server):
    server, _ = vision_server
    part = {"type": "image_url", "image_url": {"url": data_url(Image.new("RGB", (8, 8)))}}
    r = httpx.post(f"{server.base_url}/chat/completions", timeout=60, json={
        "model": MODEL, "max_tokens": 2, "messages": [{"role": "user", "content": [part] * 5}]})
    assert r.status_code == 400 and r.json()["error"]["code"] == "too_many_images", r.text
    r = httpx.post(f"{server.base_url}/chat/completions", timeout=60, json={
        "model": MODEL, "max_tokens": 2, "messages": [{"role": "system", "content": [part]},
                                                      {"role": "user", "content": "Hi"}]})
    assert r.status_code == 400 and "user messages" in r.json()["error"]["message"], r.text
    assert server.alive() and httpx.get(f"{server.url}/health", timeout=10).status_code == 200
