"""Perplexity: exact on an analytic case, and within 1 % of transformers on SmolLM2's evaluation split."""

import math

import pytest
import torch

from ligero.errors import LigeroError
from ligero.eval.data import wikipedia_split
from ligero.eval.perplexity import make_windows, perplexity


class UniformModel(torch.nn.Module):
    """Predicts every token with probability 1/V: perplexity must be exactly V."""

    def __init__(self, vocab):
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, 1)
        self.cfg = type("Cfg", (), {"max_seq_len": 4096, "vocab_size": vocab})()

    @property
    def device(self):
        return self.embed.weight.device

    def forward(self, tokens):
        return torch.zeros(*tokens.shape, self.cfg.vocab_size)


def test_uniform_model_has_perplexity_v():
    ids = list(range(100)) * 3
    res = perplexity(UniformModel(100), None, ids, ctx=64, return_logprobs=True)
    assert res.windows == 4 and res.tokens == 4 * 63  # non-overlapping windows, tail dropped
    assert res.ppl == pytest.approx(100.0)
    assert res.token_logprobs[0] == pytest.approx(-math.log(100))


def test_windows_are_non_overlapping_and_capped():
    w = make_windows(list(range(1000)), 100, max_tokens=350)
    assert [x[0] for x in w] == [0, 100, 200]
    with pytest.raises(LigeroError):
        make_windows([1], 100)


@pytest.mark.slow
def test_smollm2_perplexity_within_1pct_of_transformers(smollm2, hf_smollm2):
    ids = smollm2.tokenizer.encode(wikipedia_split("eval").text)
    ours = perplexity(smollm2.model, smollm2.tokenizer, ids, ctx=512, max_tokens=2048)
    nll, n = 0.0, 0
    with torch.no_grad():
        for window in make_windows(ids, 512, 2048):
            x = torch.tensor([window])
            logp = torch.log_softmax(hf_smollm2(x[:, :-1]).logits.float(), -1)
            nll -= float(logp.gather(-1, x[:, 1:, None]).sum())
            n += x.shape[1] - 1
    ref_ppl = math.exp(nll / n)
    assert ours.tokens == n
    assert abs(ours.ppl / ref_ppl - 1) < 0.01
    assert 10 < ours.ppl < 40  # ~20.9 on Wikipedia paragraphs per the asset notes


def test_bos_models_get_bos_at_the_start_of_every_window():
    text = list(range(10, 40))
    w = make_windows([1] + text, 8, bos=1)  # a leading BOS from the tokenizer is not counted twice
    assert all(x[0] == 1 and len(x) == 8 for x in w)
    assert [t for x in w for t in x[1:]] == text[:28]  # 4 windows of 7 text tokens, each text token once
