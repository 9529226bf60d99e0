"""The README's serve command with a card `ligero run --quick` wrote (not a hand-made one), then `ligero monitor` on the
store it fills: the card's guardrails load, its reference-profile sampling becomes the request defaults."""

from __future__ import annotations

import json

import openai
import pytest

from ligero.cli import main
from ligero.serve.store import Store

MODEL = "smollm2-135m"


@pytest.mark.slow
def test_serving_a_card_written_by_the_quick_audit(quick_run, launch, tmp_path, capsys):
    card_path = quick_run / "cards" / "as-shipped.json"  # the published GGUF as stored, audited as a variant
    sampling = json.loads(card_path.read_text())["monitoring"]["reference_profile"]["sampling"]
    store_url = f"sqlite:///{tmp_path / 'serve.db'}"
    server = launch("--card", str(card_path), "--store", store_url)
    assert server.health["variants"] == {"as-shipped": "as-shipped"}  # the card's variant, of the card's model
    defaults = (f"temperature {sampling['temperature']:g}, top_p {sampling['top_p']:g}, "
                f"max_tokens {sampling['max_new_tokens']}")
    assert server.health["defaults"].startswith(defaults)
    assert f"requests that leave them out get {defaults}" in server.log_tail()

    monitor = ["monitor", "--store", store_url, "--card", str(card_path), "--out", str(tmp_path / "monitor")]
    assert main(monitor) == 3  # no traffic yet: nothing to judge, and cron hears about it
    assert "NO_DATA (exit 3)" in capsys.readouterr().out

    client = openai.OpenAI(base_url=server.base_url, api_key="unused", max_retries=0, timeout=120)
    raw = client.chat.completions.with_raw_response.create(
        model=MODEL, messages=[{"role": "user", "content": "Tell me a long story about the sea."}])
    client.close()
    answer = raw.parse()
    assert answer.model == f"{MODEL}:as-shipped"
    assert 1 <= answer.usage.completion_tokens <= sampling["max_new_tokens"]
    with Store(store_url) as store:
        assert store.get_request(raw.headers["x-ligero-request-id"]).max_tokens == sampling["max_new_tokens"]
    assert main(monitor) == 0  # traffic, too little to judge yet: INSUFFICIENT
    assert capsys.readouterr().out.startswith("INSUFFICIENT (exit 0)")
