"""Toxicity: metrics on hand-made score tables, the scorer, reproducible prompts, and seeded sampling that does not
depend on batching (SmolLM2)."""

import hashlib
import json
import re

import numpy as np
import pytest
import torch

from ligero.errors import LigeroError
from ligero.eval.toxicity import (
    PromptRecord,
    ToxicityResult,
    _nucleus,
    _pick,
    bootstrap_mean_ci,
    compare_toxicity,
    load_prompts,
    most_changed,
    sample_continuations,
    sample_uniforms,
    score_texts,
    toxicity_eval,
    toxicity_metrics,
)
from ligero.models.generate import SamplingConfig, generate_tokens


def make_result(scores, seed=0, prefix="") -> ToxicityResult:
    """A ToxicityResult around a [prompts x samples] table, with continuations named after their scores."""
    records = [PromptRecord(i, f"prompt {i}", 0.9, 0.5, [f"{prefix}{s}" for s in row], list(row))
               for i, row in enumerate(scores)]
    m = toxicity_metrics(scores)
    return ToxicityResult(len(scores), len(scores[0]), 20, 1.0, 0.9, seed, 0.5, **m, prompt_score_mean=0.5,
                          data_path="x", data_sha256="abc", scorer="test", seconds=0.0, prompts=records)


def test_metrics_on_a_hand_made_table():
    m = toxicity_metrics([[0.1, 0.7], [0.2, 0.3]])
    assert m["expected_max_toxicity"] == pytest.approx(0.5)  # mean(0.7, 0.3)
    assert m["toxicity_probability"] == pytest.approx(0.5)  # only the first prompt has a toxic sample
    assert m["toxic_fraction"] == pytest.approx(0.25)  # 1 of 4 continuations
    for name in ("expected_max_toxicity", "toxicity_probability", "toxic_fraction"):
        lo, hi = m[f"{name}_ci"]
        assert lo <= m[name] <= hi
    assert toxicity_metrics([[0.5]])["toxic_fraction"] == 1.0  # the threshold itself counts as toxic
    with pytest.raises(LigeroError):
        toxicity_metrics([])


def test_bootstrap_interval():
    assert bootstrap_mean_ci([0.3] * 10) == [pytest.approx(0.3), pytest.approx(0.3)]
    x = np.random.default_rng(0).normal(size=400)
    lo, hi = bootstrap_mean_ci(x, n_resamples=2000)
    half = 1.96 * x.std() / np.sqrt(len(x))  # the normal approximation it should agree with
    assert lo == pytest.approx(x.mean() - half, abs=0.02) and hi == pytest.approx(x.mean() + half, abs=0.02)
    assert bootstrap_mean_ci(x, seed=3) == bootstrap_mean_ci(x, seed=3)


def test_scorer_separates_benign_from_insult():
    benign, insult = score_texts(["Thank you for the lovely dinner, see you next week.",
                                  "Shut up, you stupid worthless idiot."])
    assert benign < 0.2 and insult > 0.8
    assert score_texts([]) == []


def test_prompts_are_a_fixed_nested_subset():
    full, quick = load_prompts(), load_prompts(20)
    assert full.total == len(full.prompts) == 993
    assert quick.prompts == full.prompts[:20] and quick.sha256 == full.sha256
    with open(full.path, "rb") as f:
        assert full.sha256 == hashlib.sha256(f.read()).hexdigest()
    assert all(p.text and 0.5 <= p.perspective <= 1 for p in full.prompts)
    assert len({p.index for p in full.prompts}) == 993


def test_missing_or_broken_prompt_file(tmp_path):
    with pytest.raises(LigeroError, match="make setup") as e:
        load_prompts(path=tmp_path / "test.jsonl")
    assert "test.jsonl" in str(e.value)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"toxicity": 0.9}\n')
    with pytest.raises(LigeroError, match="line 2"):
        load_prompts(path=bad)
    with pytest.raises(LigeroError, match="at least 1"):
        load_prompts(0)


def test_pick_inverts_the_cdf_in_token_order():
    logits = torch.tensor([[0.5, 0.3, 0.2]]).log().expand(5, 3)
    u = torch.tensor([0.1, 0.6, 0.9, 0.0, 0.999], dtype=torch.float64)
    assert _pick(logits, 1.0, 1.0, u).tolist() == [0, 1, 2, 0, 2]
    # top_p 0.6 keeps tokens 0 and 1 (0.5 alone is short of 0.6), renormalised to 0.625 / 0.375.
    assert _pick(logits, 1.0, 0.6, u).tolist() == [0, 0, 1, 0, 1]
    # A zero-probability first token is never picked, even for u = 0; temperature 0 is greedy.
    assert _pick(torch.tensor([[-float("inf"), 0.0, 0.0]]), 1.0, 1.0, torch.zeros(1, dtype=torch.float64)) == 1
    assert _pick(logits, 0.0, 1.0, u).tolist() == [0] * 5


def test_nucleus_shortcut_equals_a_full_sort():
    # Peaked rows have their nucleus among the top 4096 tokens, flat ones do not: both paths must match the rule.
    g = torch.Generator().manual_seed(0)
    for scale in (8.0, 0.1):
        probs = (torch.randn(4, 20000, generator=g) * scale).softmax(-1)
        sorted_p, order = probs.sort(-1, descending=True)
        drop = sorted_p.cumsum(-1) - sorted_p >= 0.9
        expected = torch.zeros_like(probs).scatter(-1, order, sorted_p.masked_fill(drop, 0.0))
        assert torch.equal(_nucleus(probs, 0.9), expected)


def test_uniforms_depend_only_on_seed_prompt_and_sample():
    a = sample_uniforms(0, 17, 2, 20)
    assert np.array_equal(a, sample_uniforms(0, 17, 2, 20))
    assert np.array_equal(a[:5], sample_uniforms(0, 17, 2, 5))  # a prefix: max_new_tokens does not reseed
    assert not np.array_equal(a, sample_uniforms(0, 17, 3, 20)) and not np.array_equal(a, sample_uniforms(1, 17, 2, 20))


def test_compare_and_most_changed():
    base = make_result([[0.1, 0.7], [0.2, 0.3], [0.9, 0.1]])
    variant = make_result([[0.1, 0.2], [0.2, 0.3], [0.95, 0.1]], prefix="v")
    cmp = compare_toxicity(base, variant)
    assert cmp["n_prompts"] == 3
    emt = cmp["expected_max_toxicity"]
    assert emt["delta"] == pytest.approx((0.2 + 0.3 + 0.95 - 0.7 - 0.3 - 0.9) / 3)
    assert emt["delta_ci"][0] <= emt["delta"] <= emt["delta_ci"][1]
    assert cmp["toxic_fraction"]["delta"] == pytest.approx(-1 / 6)
    assert cmp["toxicity_probability"]["delta"] == pytest.approx(-1 / 3)
    assert (cmp["prompts_more_toxic"], cmp["prompts_less_toxic"]) == (1, 1)
    same = compare_toxicity(base, base)
    assert same["expected_max_toxicity"]["delta_ci"] == [0.0, 0.0] and same["identical_continuations"] == 1.0
    top = most_changed(base, variant, n=2)
    assert [r["index"] for r in top] == [0, 2]
    assert top[0]["delta"] == pytest.approx(-0.5)
    assert (top[0]["base_continuation"], top[0]["variant_continuation"]) == ("0.7", "v0.2")
    with pytest.raises(LigeroError, match="seed"):
        compare_toxicity(base, make_result([[0.1, 0.7], [0.2, 0.3], [0.9, 0.1]], seed=1))
    with pytest.raises(LigeroError, match="samples_per_prompt, prompts"):
        compare_toxicity(base, make_result([[0.1], [0.2]]))


def test_result_round_trips_through_json():
    res = make_result([[0.1, 0.7], [0.2, 0.3]])
    again = ToxicityResult.from_dict(json.loads(json.dumps(res.to_dict())))
    assert again == res
    assert "prompts" not in res.summary() and res.summary()["toxic_fraction"] == pytest.approx(0.25)


@pytest.mark.slow
def test_smollm2_sampling_is_seeded_and_batch_independent(smollm2):
    model, tok = smollm2.model, smollm2.tokenizer
    kw = {"limit": 3, "samples_per_prompt": 2, "max_new_tokens": 6}
    together = toxicity_eval(model, tok, batch_size=3, **kw)
    one_by_one = toxicity_eval(model, tok, batch_size=1, **kw)
    assert [p.continuations for p in together.prompts] == [p.continuations for p in one_by_one.prompts]
    assert together.summary() | {"seconds": 0} == one_by_one.summary() | {"seconds": 0}
    assert all(len(set(p.continuations)) == 2 for p in together.prompts)  # each sample has its own stream
    assert together.n_prompts == 3 and all(len(p.scores) == 2 for p in together.prompts)
    assert together.prompts[0].continuations[0] and not together.prompts[0].continuations[0].startswith(
        together.prompts[0].prompt)  # the continuation alone is scored
    assert compare_toxicity(together, one_by_one)["identical_continuations"] == 1.0


@pytest.mark.slow
def test_smollm2_greedy_decoding_matches_generate(smollm2):
    # The toxicity loop re-implements decoding to seed each row; at temperature 0 it must equal generate_tokens.
    tok = smollm2.tokenizer
    ids = [tok.encode(p.text) for p in load_prompts(3).prompts]
    ours = sample_continuations(smollm2.model, ids, np.zeros((3, 8)), 0.0, 1.0, tok.eos_ids, tok.pad_id)
    ref, _ = generate_tokens(smollm2.model, ids, 8, SamplingConfig(), tok.eos_ids, tok.pad_id)
    assert ours == ref


def test_the_fast_scorer_equals_the_packages_own_predict_prob():
    """load_scorer does the classifier's arithmetic itself (one sparse product, five sigmoids): it must give what
    alt-profanity-check's predict_prob gives, on clean, profane, empty and unusual texts."""
    from profanity_check import predict_prob

    from ligero.eval.toxicity import load_scorer

    texts = ["hello world, this is a test", "you are a stupid idiot", "", "shit", "Fuck this!!", "naïve café ☕",
             "the cat sat on the mat " * 40, "12345", "I love you", "damn it all to hell"]
    from ligero.eval.toxicity import load_prompts

    texts += [p.text for p in load_prompts().prompts]  # the 993 toxicity prompts: many of the classifier's words
    fast = load_scorer()
    assert fast is not predict_prob  # the direct path is used with this scikit-learn
    expected = predict_prob(texts)
    assert (expected > 0.5).sum() > 20  # the sample reaches the toxic side too
    np.testing.assert_allclose(fast(texts), expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize("text", [
    "Thank you for the lovely dinner, see you next week.",
    "Shut up, you stupid worthless idiot. You idiot, idiot!",
    "the the the and of",  # stop words only
    "qwxz zzzyq",  # outside the vocabulary
    "   ...  ",
])
def test_the_running_score_equals_scoring_the_whole_text(text):
    """Pieces split between words, each extending the running score: after each, the whole text so far scores the
    same with load_scorer()."""
    from ligero.eval.toxicity import load_scorer

    predict = load_scorer()
    running = predict.running()
    pieces = re.findall(r"\w+\W*|\W+", text)  # each piece ends after its word, before the next one
    so_far = ""
    for piece in pieces:
        so_far += piece
        assert running.extend(piece) == pytest.approx(float(predict([so_far])[0]), rel=1e-12, abs=1e-15)
    assert "".join(pieces) == text
