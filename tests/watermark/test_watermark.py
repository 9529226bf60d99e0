"""The watermark's parts: key files, green lists, the detector's statistics, and marking inside batched generation."""

from __future__ import annotations

import json
import math
import os
import stat

import pytest
import torch
from scipy.stats import binom

from ligero.errors import LigeroError
from ligero.lab.models import SIZES, build_model, tiny_config
from ligero.models.generate import BatchGeneration, SamplingConfig
from ligero.watermark import (
    Detector,
    GreenList,
    Watermarker,
    WatermarkKey,
    WatermarkSettings,
    load_key,
    new_key,
    save_key,
)

VOCAB = 512


def make_key(settings: WatermarkSettings | None = None, secret: bytes = b"k" * 32) -> WatermarkKey:
    return WatermarkKey(secret, settings or WatermarkSettings(), "0" * 64, VOCAB, "tiny")


def hand_made(key: WatermarkKey, pattern: list[bool], start: int = 7) -> list[int]:
    """A token sequence whose scored positions are green or red as `pattern` says, each (context, token) n-gram new:
    every token is picked from the green list (or its complement) that generation computes for its context."""
    gl, w = GreenList(key, VOCAB), key.settings.context_width
    seq = [start + i for i in range(w)]  # the first w tokens only give context (unigram: none)
    for want in pattern:
        green = gl.mask(torch.tensor([seq[-w:] if w else [0]]))[0]
        seq.append(next(t for t in range(VOCAB) if bool(green[t]) == want and t not in seq))
    return seq


@pytest.mark.parametrize("preset", ["lefthash", "selfhash", "unigram"])
def test_the_z_score_is_the_formula_on_hand_made_sequences(preset):
    key = make_key(WatermarkSettings.preset(preset))
    pattern = [i % 4 != 3 for i in range(40)]  # 30 green of 40
    d = Detector(key).detect(hand_made(key, pattern))
    scored, green, gamma = 40, 30, 0.25
    assert (d.scored, d.green, d.repeated) == (scored, green, 0)
    assert d.z == pytest.approx((green - gamma * scored) / math.sqrt(scored * gamma * (1 - gamma)), abs=1e-12)
    assert d.p_value == pytest.approx(float(binom.sf(green - 1, scored, gamma)), rel=1e-9)
    assert d.p_normal == pytest.approx(0.5 * math.erfc(d.z / math.sqrt(2)), rel=1e-9)
    assert d.watermarked == (d.z >= 4)
    unmarked = Detector(key).detect(hand_made(key, [i % 4 == 3 for i in range(40)]))  # 10 of 40: exactly gamma
    assert (unmarked.green, unmarked.z, unmarked.watermarked) == (10, 0.0, False)


def test_repeated_ngrams_are_scored_once():
    key = make_key()
    gl = GreenList(key, VOCAB)
    a, b, c = 11, 12, 13
    d = Detector(key, min_scored=1).detect([a, b, a, b, a, b, c])
    # bigrams: (a,b) (b,a) (a,b) (b,a) (a,b) (b,c): three distinct
    assert (d.scored, d.repeated) == (3, 3)
    expected = sum(bool(gl.mask(torch.tensor([[x]]))[0, y]) for x, y in ((a, b), (b, a), (b, c)))
    assert d.green == expected
    u = Detector(make_key(WatermarkSettings.preset("unigram")), min_scored=1).detect([a, b, a, b, c])
    assert (u.scored, u.repeated) == (3, 2)  # unigram: each distinct token once


def test_green_lists_hold_gamma_of_the_vocabulary_and_depend_on_the_key():
    for gamma in (0.1, 0.25, 0.5):
        gl = GreenList(make_key(WatermarkSettings(gamma=gamma)), 49152)
        share = gl.mask(torch.arange(64)[:, None]).float().mean(1)
        assert share.sub(gamma).abs().max() < 0.01
    one = GreenList(make_key(), VOCAB).mask(torch.tensor([[5]]))
    other = GreenList(make_key(secret=b"q" * 32), VOCAB).mask(torch.tensor([[5]]))
    assert 0.1 < (one != other).float().mean() < 0.6  # independent lists disagree on 2 gamma (1 - gamma) of ids


def test_the_detector_is_calibrated_on_human_text():
    """p-values of unmarked human text (Wikipedia evaluation split, SmolLM2's tokenizer) are about uniform: z has
    mean 0 and variance 1, and each tail holds no more than its share."""
    from ligero.eval.data import wikipedia_split
    from ligero.io.checkpoint import load_tokenizer

    tok = load_tokenizer("smollm2-135m")
    ids = tok.encode(wikipedia_split("eval").text[:1_500_000])
    windows = [ids[i: i + 100] for i in range(0, len(ids) - 100, 100)][:1200]
    det = Detector(WatermarkKey(b"calibration-key!" * 2, WatermarkSettings(), "0" * 64, 49152, "smollm2-135m"))
    results = [det.detect(w) for w in windows]
    z = torch.tensor([r.z for r in results])
    p = torch.tensor([r.p_value for r in results])
    assert abs(float(z.mean())) < 0.12 and 0.85 < float(z.std()) < 1.15
    for alpha in (0.01, 0.05, 0.2, 0.5):  # the exact test is conservative: never much above alpha
        assert float((p <= alpha).float().mean()) <= alpha + 3 * math.sqrt(alpha * (1 - alpha) / len(p))
    assert float((p <= 0.5).float().mean()) > 0.35  # and not degenerate
    assert not any(r.watermarked for r in results)


@pytest.fixture(scope="module")
def tiny_model():
    torch.manual_seed(0)
    return build_model(tiny_config(SIZES["test"], VOCAB, 256), seed=3).eval()


SAMPLERS = {"greedy": dict(), "temperature": dict(temperature=1.0, seed=1),
            "top-k": dict(temperature=0.8, top_k=40, seed=2), "top-p": dict(temperature=1.0, top_p=0.9, seed=3)}


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_marked_batched_generation_is_detected_and_unmarked_is_not(smollm2, sampler):
    """SmolLM2, three prompts of different lengths in one batch (left padding), 48 new tokens each; delta 4 so that
    48 tokens suffice at every row."""
    model, tok = smollm2.model, smollm2.tokenizer
    key = WatermarkKey(b"s" * 32, WatermarkSettings(delta=4.0), "0" * 64, 49152, "smollm2-135m")
    prompts = [tok.encode(p) for p in ("The river", "In 1905 the city council decided to build a new bridge over",
                                       "Scientists studying the deep ocean have found")]
    no_eos = {e: -100.0 for e in tok.eos_ids}
    for processor in (Watermarker(key, model.cfg.vocab_size), None):
        sampling = SamplingConfig(**SAMPLERS[sampler], logit_bias=no_eos, logits_processor=processor)
        gen = BatchGeneration(model, prompts, 48, sampling, tok.eos_ids, tok.pad_id)
        while not gen.done:
            gen.step()
        for tokens in gen.tokens:
            d = Detector(key).detect(tok.encode(tok.decode(tokens), add_bos=False), check_length=False)
            if processor is not None:
                assert d.scored >= 16 and d.z > 4, (sampler, d)
            else:
                assert d.z < 4, (sampler, d)


def test_each_row_is_marked_as_if_it_were_alone(tiny_model):
    """Per-row settings: a marked row, an unmarked row and a row under another key, batched together, give each
    row the tokens it gets alone."""
    a, b = Watermarker(make_key(), VOCAB), Watermarker(make_key(secret=b"other-key" * 4), VOCAB)
    prompts = [[3, 4, 5], [9, 10], [30]]
    configs = [SamplingConfig(temperature=1.0, seed=5, logits_processor=a), SamplingConfig(temperature=1.0, seed=6),
               SamplingConfig(temperature=1.0, seed=7, logits_processor=b)]

    def run(ps, cs):
        gen = BatchGeneration(tiny_model, ps, 24, cs)
        while not gen.done:
            gen.step()
        return gen.tokens

    together = run(prompts, configs)
    alone = [run([p], [c])[0] for p, c in zip(prompts, configs)]
    assert together == alone
    assert together[0] != run(prompts[:1], [SamplingConfig(temperature=1.0, seed=5)])[0]  # the mark changed it


def test_key_files_round_trip_and_stay_private(tmp_path):
    class Tok:  # what a key needs of a tokenizer
        vocab_size = VOCAB
        sha256 = "a" * 64

    key = new_key(WatermarkSettings.preset("selfhash", gamma=0.3, delta=1.5), Tok(), "tiny")
    path = save_key(key, tmp_path / "wm.key")
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    again = load_key(path)
    assert again == key and again.key_id == key.key_id and key.key_id.startswith("wm-")
    assert key.secret.hex() not in json.dumps(key.public()) and key.secret.hex() not in key.key_id
    with pytest.raises(LigeroError, match="already exists"):
        save_key(key, path)
    key.check_tokenizer(Tok(), "tiny")
    Tok.sha256 = "b" * 64
    with pytest.raises(LigeroError, match="was made for the tokenizer of tiny"):
        key.check_tokenizer(Tok(), "other-model")


@pytest.mark.parametrize("content, message", [
    (None, "does not exist; create one with `ligero watermark keygen"),
    ("{not json", "is not a watermark key \\(not JSON"),
    ('{"format": "something-else"}', "is not a Ligero watermark key"),
    ("[1, 2]", "is not a Ligero watermark key"),
    ('{"format": "ligero-watermark-key", "version": 1, "secret": "zz"}', "malformed watermark key"),
])
def test_bad_key_files_are_one_clear_error(tmp_path, content, message):
    path = tmp_path / "bad.key"
    if content is not None:
        path.write_text(content)
    with pytest.raises(LigeroError, match=message):
        load_key(path)


def test_a_tampered_key_is_refused(tmp_path):
    key = make_key()
    d = key.to_dict()
    d["secret"] = "ab" * 32
    (tmp_path / "k").write_text(json.dumps(d))
    with pytest.raises(LigeroError, match="corrupt"):
        load_key(tmp_path / "k")
    d = key.to_dict() | {"gamma": 1.5}
    (tmp_path / "g").write_text(json.dumps(d))
    with pytest.raises(LigeroError, match="gamma"):
        load_key(tmp_path / "g")


def test_short_texts_are_refused_with_the_minimum():
    with pytest.raises(LigeroError, match="needs at least 16: give a longer text"):
        Detector(make_key()).detect([1, 2, 3, 4, 5])
    with pytest.raises(LigeroError, match="unknown watermark scheme"):
        WatermarkSettings(scheme="rainbow")
