"""The app's wiring in-process, without a model: /health, /metrics access, request defaults from a card."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from ligero.errors import LigeroError
from ligero.serve.access import ApiKeys
from ligero.serve.app import create_app
from ligero.serve.config import RequestDefaults, ServerConfig
from ligero.serve.store import Store


def app_client(**settings) -> TestClient:
    cfg = ServerConfig(model_id="m", variants={}, tokenizer=None, store=Store("sqlite://"), **settings)
    return TestClient(create_app(cfg))


@pytest.mark.parametrize("public", [False, True])
def test_metrics_are_public_only_when_the_operator_says_so(public):
    with app_client(api_keys=ApiKeys(["key-1"]), public_metrics=public) as client:
        assert client.get("/health").status_code == 200  # always open: load balancers probe it
        r = client.get("/metrics")
        assert r.status_code == (200 if public else 401), r.text
        assert client.get("/metrics", headers={"Authorization": "Bearer key-1"}).status_code == 200
        assert client.get("/v1/models").status_code == 401  # the choice concerns /metrics only
    with app_client() as client:  # no keys: nothing to check
        assert client.get("/metrics").status_code == 200


def test_request_defaults_come_from_the_card_profile():
    card = {"monitoring": {"reference_profile": {"sampling": {"temperature": 0.7, "top_p": 0.9,
                                                              "max_new_tokens": 32, "seed": 0}}}}
    defaults = RequestDefaults.from_card(card, "card x")
    assert (defaults.temperature, defaults.top_p, defaults.max_tokens) == (0.7, 0.9, 32)
    assert defaults.max_tokens_for("chat") == defaults.max_tokens_for("completions") == 32
    assert "temperature 0.7, top_p 0.9, max_tokens 32 (the reference profile of card x)" == defaults.describe()
    plain = RequestDefaults()  # OpenAI's
    assert (plain.max_tokens_for("completions"), plain.max_tokens_for("chat")) == (16, None)
    with pytest.raises(LigeroError, match="card x has no monitoring.reference_profile.sampling"):
        RequestDefaults.from_card({"monitoring": {}}, "card x")
    card["monitoring"]["reference_profile"]["sampling"]["top_p"] = 0
    with pytest.raises(LigeroError, match="out of range"):
        RequestDefaults.from_card(card, "card x")
    with app_client(defaults=defaults) as client:
        assert client.get("/health").json()["defaults"] == defaults.describe()
