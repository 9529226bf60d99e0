"""`ligero serve --watermark KEY`: served text carries the mark (and says which key), unmarked serving does not, and
the secret reaches neither the store, the logs, the answers nor /health."""

from __future__ import annotations

import base64
import json
import logging

import pytest
from fastapi.testclient import TestClient

from ligero.cli import main
from ligero.errors import LigeroError
from ligero.io.checkpoint import load_tokenizer
from ligero.serve.app import create_app
from ligero.serve.server import build_config
from ligero.serve.store import ResponseRecord
from ligero.watermark import detect_text, load_key

PROMPT = "The history of the old harbour town begins"
NO_EOS = {"0": -100, "1": -100, "2": -100}  # SmolLM2's end-of-text tokens


def serve_once(folder, name: str, watermark: str | None, tokens: int) -> tuple[dict, dict, list]:
    cfg = build_config("smollm2-135m", ["fp32"], store_url=f"sqlite:///{folder / name}.db", keep_text=True,
                       watermark_file=watermark)
    try:
        with TestClient(create_app(cfg)) as client:
            # EOS barred, so the text has the length asked for.
            r = client.post("/v1/completions", json={"model": "smollm2-135m", "prompt": PROMPT, "max_tokens": tokens,
                                                     "temperature": 1.0, "seed": 4, "logit_bias": NO_EOS})
            assert r.status_code == 200, r.text
            health = client.get("/health").json()
            with client.stream("POST", "/v1/chat/completions", json={
                    "model": "smollm2-135m", "messages": [{"role": "user", "content": "Tell me about rivers."}],
                    "max_tokens": 8, "stream": True}) as s:
                streamed_header = s.headers.get("x-ligero-watermark")
                list(s.iter_lines())
        with cfg.store._sessions() as session:
            rows = [(row.id, row.watermark_key_id) for row in session.query(ResponseRecord).all()]
    finally:
        for v in cfg.variants.values():
            v.engine.close()
        cfg.store.close()
    return {**r.json(), "header": r.headers.get("x-ligero-watermark"), "streamed_header": streamed_header}, \
        health, rows


def test_served_text_is_marked_only_with_the_key(tmp_path, caplog, capsys):
    key_path = tmp_path / "serve.key"
    assert main(["watermark", "keygen", "--out", str(key_path)]) == 0
    key = load_key(key_path)
    caplog.set_level(logging.DEBUG)
    # Marked text: 200 tokens, since z grows with sqrt(length) and the key is a fresh random one each run (measured
    # over 12 keys: z 10.6-13.6 at 200 tokens; 5.1-8.5 at 80, and one CI run drew 3.75 at 80). Unmarked text's z is
    # about N(0, 1) at any length: 60 tokens suffice to show it is not flagged.
    marked, health, marked_rows = serve_once(tmp_path, "marked", str(key_path), tokens=200)
    plain, plain_health, plain_rows = serve_once(tmp_path, "plain", None, tokens=60)
    tok = load_tokenizer("smollm2-135m")

    assert marked["watermark"] == {"key_id": key.key_id, "scheme": "kgw"}
    assert marked["header"] == marked["streamed_header"] == key.key_id
    d = detect_text(marked["choices"][0]["text"], tok, key)
    assert d.watermarked and d.z > 4, d
    assert "watermark" not in plain and plain["header"] is None and plain["streamed_header"] is None
    assert not detect_text(plain["choices"][0]["text"], tok, key).watermarked
    assert [k for _, k in marked_rows] == [key.key_id] * 2 and [k for _, k in plain_rows] == [None] * 2
    assert health["watermark"]["key_id"] == key.key_id and plain_health["watermark"] is None

    # No key material anywhere the server writes or answers.
    secret_forms = [key.secret.hex(), key.secret.hex().upper(), base64.b64encode(key.secret).decode()]
    written = b"".join(p.read_bytes() for p in tmp_path.glob("marked.db*"))
    said = caplog.text + capsys.readouterr().out + json.dumps(marked) + json.dumps(health)
    for form in secret_forms:
        assert form.encode() not in written and form not in said
    assert key.secret not in written
    assert key.key_id in caplog.text  # the log names the key it marks with


def test_a_bad_key_stops_the_server_before_it_loads_a_model(tmp_path):
    bad = tmp_path / "bad.key"
    bad.write_text("{}")
    with pytest.raises(LigeroError, match="not a Ligero watermark key"):
        build_config("smollm2-135m", ["fp32"], store_url=f"sqlite:///{tmp_path / 's.db'}", watermark_file=str(bad))
