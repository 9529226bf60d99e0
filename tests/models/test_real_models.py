"""The real built-in models against transformers' own GGUF loader (the oracle)."""

import pytest
import torch

from hf_oracle import hf_tokenizer
from ligero.eval.data import wikipedia_split
from ligero.models.generate import generate_tokens

pytestmark = pytest.mark.slow


def passage_ids(tokenizer, n=128):
    return tokenizer.encode(wikipedia_split("eval").text)[:n]


def hf_greedy(hf, ids, steps):
    out = hf(torch.tensor([ids]), use_cache=True)
    past, new = out.past_key_values, []
    for _ in range(steps):
        nxt = int(out.logits[0, -1].argmax())
        new.append(nxt)
        out = hf(torch.tensor([[nxt]]), past_key_values=past, use_cache=True)
        past = out.past_key_values
    return new


@pytest.mark.parametrize("model_id", ["smollm2-135m", "gemma3-270m"])
def test_real_gguf_matches_transformers(model_id, hf_gguf):
    from ligero.io.checkpoint import load_model

    ours = load_model(model_id, device="cpu")
    hf = hf_gguf(model_id)
    ids = passage_ids(ours.tokenizer)
    assert len(ids) == 128
    with torch.no_grad():
        expected = hf(torch.tensor([ids])).logits
        got = ours.model(torch.tensor([ids]))
    torch.testing.assert_close(got, expected, atol=1e-3, rtol=0)
    with torch.no_grad():
        hf_tokens = hf_greedy(hf, ids[:48], 32)
    our_tokens, _ = generate_tokens(ours.model, [ids[:48]], 32, eos_ids=[])
    assert our_tokens[0] == hf_tokens


def test_tokenizers_match_transformers():
    from ligero.io.checkpoint import load_model

    text = "Ligero's tokenizer: naïve café, 1234 numbers, and émojis 🙂 — capital!"
    for model_id in ("smollm2-135m", "gemma3-270m"):
        ours = load_model(model_id, device="cpu").tokenizer
        ref = hf_tokenizer(model_id)
        assert ours.encode(text) == ref(text).input_ids
        assert ours.decode(ours.encode(text)) == text


def test_chat_template_renders_smollm2_format(smollm2):
    text = smollm2.tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}])
    assert text.endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")


def test_stop_strings_and_streaming(smollm2):
    from ligero.models.generate import generate

    tok = smollm2.tokenizer
    prompt = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}])
    free = generate(smollm2.model, tok, [prompt], 24, add_bos=False)
    assert "Paris" in free.texts[0] and free.finish_reasons == ["eos"]
    pieces = []
    cut = generate(smollm2.model, tok, [prompt], 24, stop_strings=["Paris"], add_bos=False,
                   on_text=lambda i, d: pieces.append(d))
    assert cut.finish_reasons == ["stop"]
    assert cut.texts[0] == free.texts[0][: free.texts[0].index("Paris")]
    assert "".join(pieces) == cut.texts[0]
