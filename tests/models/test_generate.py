"""Sampling and stopping rules."""

import copy

import pytest
import torch

from ligero.errors import LigeroError
from ligero.models import generate
from ligero.models.generate import BatchGeneration, SamplingConfig, generate_tokens, greedy_pick, sample_next


def test_greedy_and_degenerate_sampling_agree():
    logits = torch.randn(4, 50, generator=torch.Generator().manual_seed(0))
    greedy = sample_next(logits, SamplingConfig(), None)
    assert torch.equal(greedy, logits.argmax(-1))
    g = torch.Generator().manual_seed(1)
    assert torch.equal(sample_next(logits, SamplingConfig(temperature=1.0, top_k=1), g), greedy)
    assert torch.equal(sample_next(logits, SamplingConfig(temperature=1.0, top_p=1e-6), g), greedy)


def test_top_k_and_top_p_restrict_the_support():
    logits = torch.tensor([[4.0, 3.0, 2.0, 1.0, 0.0]])
    g = torch.Generator().manual_seed(0)
    k2 = {int(sample_next(logits, SamplingConfig(temperature=2.0, top_k=2), g)) for _ in range(200)}
    assert k2 == {0, 1}
    probs = logits.softmax(-1)[0]
    p = float(probs[0] + probs[1]) - 1e-4  # needs the two most likely tokens
    p2 = {int(sample_next(logits, SamplingConfig(temperature=1.0, top_p=p), g)) for _ in range(300)}
    assert p2 == {0, 1}


def test_seeded_sampling_is_reproducible_and_follows_the_distribution():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.2]]))
    draw = lambda seed: [int(sample_next(logits, SamplingConfig(1.0, seed=seed), g)) for g in  # noqa: E731
                         [torch.Generator().manual_seed(seed)] for _ in range(2000)]
    a, b = draw(7), draw(7)
    assert a == b
    freq = torch.bincount(torch.tensor(a), minlength=3).float() / len(a)
    torch.testing.assert_close(freq, torch.tensor([0.5, 0.3, 0.2]), atol=0.04, rtol=0)


def test_invalid_sampling_settings_are_rejected():
    for bad in (dict(temperature=-1), dict(top_k=-2), dict(top_p=0.0), dict(top_p=1.5)):
        with pytest.raises(LigeroError):
            SamplingConfig(**bad)


def test_generation_stops_on_eos_and_on_callback(tiny_pair):
    _, model, _ = tiny_pair
    prompt = [[1, 2, 3]]
    free, _ = generate_tokens(model, prompt, 10)
    first = free[0][0]
    stopped, reasons = generate_tokens(model, prompt, 10, eos_ids=[first])
    assert stopped == [[]] and reasons == ["eos"]
    cut, reasons = generate_tokens(model, prompt, 10, on_token=lambda i, t: True)
    assert cut == [[first]] and reasons == ["stop"]


def test_prompt_longer_than_context_is_a_clear_error(tiny_pair):
    _, model, _ = tiny_pair
    with pytest.raises(LigeroError, match="context"):
        generate_tokens(model, [[1] * (model.cfg.max_seq_len + 5)], 4)


def test_batch_rows_keep_their_own_settings_budgets_and_random_streams(tiny_pair):
    """A request's sample must not depend on what the server batched it with: per-row seeds, budgets, finish."""
    _, model, _ = tiny_pair
    prompts = [[1, 2, 3], [4, 5], [6, 7, 8, 9]]
    settings = [SamplingConfig(1.0, seed=11), SamplingConfig(), SamplingConfig(0.8, top_p=0.9, seed=5)]
    budgets = [6, 3, 5]
    batch = BatchGeneration(model, prompts, budgets, settings)
    steps, logprobs = 0, [[] for _ in prompts]
    while not batch.done:
        for i, _, lp in batch.step():
            logprobs[i].append(lp)
        steps += 1
    assert [len(t) for t in batch.tokens] == budgets and batch.reasons == ["length"] * 3
    assert steps == max(budgets)
    for i, (p, s, n) in enumerate(zip(prompts, settings, budgets)):
        alone = BatchGeneration(model, [p], n, [s])
        alone_lp = []
        while not alone.done:
            alone_lp += [lp for _, _, lp in alone.step()]
        assert alone.tokens[0] == batch.tokens[i]
        torch.testing.assert_close(torch.tensor(alone_lp), torch.tensor(logprobs[i]), atol=1e-4, rtol=0)
    assert all(lp <= 0 for row in logprobs for lp in row)


def test_batch_logprobs_are_the_untempered_log_softmax(tiny_pair):
    _, model, _ = tiny_pair
    batch = BatchGeneration(model, [[1, 2, 3]], 1, [SamplingConfig(1.5, seed=3)])
    expected = torch.log_softmax(model(torch.tensor([[1, 2, 3]]))[0, -1].float(), -1)
    (_, token, lp), = batch.step()
    assert lp == pytest.approx(float(expected[token]), abs=1e-5)


def test_a_finished_row_stops_while_the_others_go_on(tiny_pair):
    _, model, _ = tiny_pair
    batch = BatchGeneration(model, [[1, 2, 3], [4, 5, 6]], 8, [SamplingConfig(), SamplingConfig()])
    batch.step()
    batch.finish(0, "cancelled")
    produced = batch.step()
    assert [i for i, _, _ in produced] == [1]
    assert batch.reasons[0] == "cancelled" and len(batch.tokens[0]) == 1
    with pytest.raises(LigeroError, match="one max_new_tokens"):
        BatchGeneration(model, [[1], [2]], [4], None)


def _greedy_reference(model, prompt: list[int], n: int, sampling: SamplingConfig) -> list[int]:
    """Greedy decoding without a KV cache, with OpenAI's logit adjustments written out as in its documentation:
    logit - count * frequency_penalty - (count > 0) * presence_penalty + logit_bias."""
    tokens, out = list(prompt), []
    counts = torch.zeros(model.cfg.vocab_size)
    for _ in range(n):
        logits = model(torch.tensor([tokens]))[0, -1].float().clone()
        logits -= counts * sampling.frequency_penalty + (counts > 0).float() * sampling.presence_penalty
        for token, value in sampling.logit_bias.items():
            logits[token] += value
        t = int(logits.argmax())
        out.append(t)
        tokens.append(t)
        counts[t] += 1
    return out


def _run(batch: BatchGeneration) -> BatchGeneration:
    while not batch.done:
        batch.step()
    return batch


@pytest.mark.parametrize("settings", [dict(frequency_penalty=1.5), dict(presence_penalty=2.0),
                                      dict(frequency_penalty=-0.5, presence_penalty=2.0),
                                      dict(logit_bias={5: 3.0, 7: -100.0})])
def test_penalties_and_logit_bias_follow_openai(tiny_pair, settings):
    _, model, _ = tiny_pair
    prompt, plain = [1, 2, 3], SamplingConfig()
    sampling = SamplingConfig(**settings)
    expected = _greedy_reference(model, prompt, 12, sampling)
    # Batched with a plain row: the adjusted row follows the reference, the plain row is untouched by it.
    batch = _run(BatchGeneration(model, [prompt, [4, 5, 6]], 12, [sampling, plain]))
    assert batch.tokens[0] == expected
    assert batch.tokens[1] == _run(BatchGeneration(model, [[4, 5, 6]], 12, [plain])).tokens[0]
    assert expected != _greedy_reference(model, prompt, 12, plain)  # the setting changed something


def test_a_large_logit_bias_forces_or_forbids_a_token(tiny_pair):
    _, model, _ = tiny_pair
    forced = _run(BatchGeneration(model, [[1, 2, 3]], 6, [SamplingConfig(0.9, seed=1, logit_bias={9: 100.0})]))
    assert forced.tokens[0] == [9] * 6
    greedy = _run(BatchGeneration(model, [[1, 2, 3]], 6)).tokens[0]
    banned = dict.fromkeys(set(greedy), -100.0)
    other = _run(BatchGeneration(model, [[1, 2, 3]], 6, SamplingConfig(logit_bias=banned))).tokens[0]
    assert not set(other) & set(greedy)


def test_top_logprobs_are_the_most_likely_tokens_of_the_model(tiny_pair):
    _, model, _ = tiny_pair
    batch = BatchGeneration(model, [[1, 2, 3], [4, 5]], 2, [SamplingConfig(), SamplingConfig()], top_logprobs=[3, 0])
    expected = torch.log_softmax(model(torch.tensor([[1, 2, 3]]))[0, -1].float(), -1)
    (row, token, lp), _ = batch.step()
    assert list(batch.alternatives) == [0]  # the row that asked
    top = batch.alternatives[0]
    assert [t for t, _ in top] == expected.topk(3).indices.tolist() and top[0] == (token, pytest.approx(lp))
    assert [v for _, v in top] == pytest.approx(expected.topk(3).values.tolist(), abs=1e-5)
    batch.step()
    assert batch.done and batch.step() == [] and batch.alternatives == {}


def test_invalid_logit_adjustments_are_rejected(tiny_pair):
    _, model, _ = tiny_pair
    for bad in (dict(presence_penalty=2.5), dict(frequency_penalty=float("nan")), dict(logit_bias={3: 101.0}),
                dict(logit_bias={-1: 1.0})):
        with pytest.raises(LigeroError):
            SamplingConfig(**bad)
    with pytest.raises(LigeroError, match="vocabulary"):
        BatchGeneration(model, [[1]], 2, SamplingConfig(logit_bias={model.cfg.vocab_size: 1.0}))


@pytest.mark.parametrize("kv", [None, "kv4"])
def test_prompts_prefilled_in_chunks_generate_what_one_pass_does(tiny_pair, monkeypatch, kv):
    """A wide model prefills a prompt batch a few positions at a time (its activations bounded): the logits and the
    tokens are those of one pass, past the sliding window too (tiny Mistral's and Gemma 3's window is 8)."""
    import ligero.models.generate as generate
    from ligero.quant.api import quantize
    from ligero.quant.config import recipe_for

    _, model, _ = tiny_pair
    if kv is not None:
        model = quantize(copy.deepcopy(model), recipe_for(kv))
    prompts = [list(range(3, 23)), [5, 6, 7], list(range(40, 53))]  # 20, 3 and 13 tokens: left padding
    one_pass = BatchGeneration(model, prompts, 6)
    passes = []
    real = model.forward
    monkeypatch.setattr(model, "forward", lambda tokens, *a, **k: passes.append(tokens.shape[1]) or real(tokens, *a,
                                                                                                          **k))
    monkeypatch.setattr(generate, "batch_token_budget", lambda cfg: 3 * 5)  # 5 positions per pass for 3 rows
    chunked = BatchGeneration(model, prompts, 6)
    assert passes == [5, 5, 5, 5]
    torch.testing.assert_close(chunked.logits, one_pass.logits, rtol=1e-5, atol=1e-5)
    assert _run(chunked).tokens == _run(one_pass).tokens


@pytest.mark.parametrize("native", [True, False])
def test_greedy_pick_is_argmax_and_the_models_log_prob(compiled_kernels, monkeypatch, native):
    """The greedy token of the scores (the first maximum on ties, as argmax) and its log-prob under the
    unadjusted logits, natively or in torch; ragged vocabulary sizes cover the vector tails."""
    if not native:
        monkeypatch.setattr(generate, "cpu_kernels", lambda: None)
    g = torch.Generator().manual_seed(0)
    for rows, vocab in ((1, 49152), (16, 1003), (3, 7)):
        logits = torch.randn(rows, vocab, generator=g) * 4
        scores = logits.clone()
        scores[:, vocab // 2] = scores.max() + 1  # a biased token wins in the scores, not in the logits
        scores[0, vocab // 3] = scores[0, vocab // 2]  # a tie in row 0: the first one is the pick
        ids, log_probs = greedy_pick(scores, logits)
        assert ids == scores.argmax(-1).tolist() and ids[0] == vocab // 3
        expected = torch.log_softmax(logits.double(), -1)[torch.arange(rows), ids]
        torch.testing.assert_close(torch.tensor(log_probs, dtype=torch.float64), expected, rtol=1e-5, atol=1e-5)
    same, _ = greedy_pick(logits, logits)
    assert same == logits.argmax(-1).tolist()


@pytest.mark.parametrize("native", [True, False])
def test_greedy_under_a_logit_bias_equals_argmax_of_the_biased_logits(compiled_kernels, monkeypatch, native):
    """greedy_adjusted: rows with only a logit_bias take one native pass without a biased copy of the logits; the
    tokens are argmax of the biased logits (the first maximum on ties), the log-probs the model's own. Covered: the
    largest logit biased down (the runner-up wins), a biased token lifted to the top, a tie between a biased and an
    unbiased token, rows without any adjustment, and rows with penalties (the general path)."""
    if not native:
        monkeypatch.setattr(generate, "cpu_kernels", lambda: None)
    g = torch.Generator().manual_seed(1)
    rows, vocab = 6, 1003
    logits = torch.randn(rows, vocab, generator=g) * 4
    top = logits.argmax(-1)
    logits[3, 10] = logits[3].max() - 2.0  # row 3: token 10 + bias 2 ties with the unbiased max at a later index
    top[3] = logits[3].argmax()
    assert top[3] > 10
    samplings = [SamplingConfig(logit_bias={int(top[0]): -100.0, 7: 1.0}),  # its largest logit pushed down
                 SamplingConfig(logit_bias={5: 50.0}),  # lifted to the top
                 SamplingConfig(),  # no adjustment
                 SamplingConfig(logit_bias={10: 2.0}),
                 SamplingConfig(logit_bias={int(top[4]): 0.0}),  # biased by nothing: the same token
                 SamplingConfig(logit_bias={2: -1.0})]
    adjust = [generate.RowAdjustments.for_row(s, [1, 2], vocab, "cpu") for s in samplings]
    ids, log_probs = generate.greedy_adjusted(logits, adjust)
    expected_ids = generate.adjusted_logits(logits, adjust).argmax(-1)
    assert ids == expected_ids.tolist() and ids[1] == 5 and ids[3] == 10 and ids[0] != top[0] and ids[4] == top[4]
    expected = torch.log_softmax(logits.double(), -1)[torch.arange(rows), expected_ids]
    torch.testing.assert_close(torch.tensor(log_probs, dtype=torch.float64), expected, rtol=1e-5, atol=1e-5)
    penalized = [generate.RowAdjustments.for_row(SamplingConfig(presence_penalty=1.0, logit_bias={5: 50.0}),
                                                 [1], vocab, "cpu")] + adjust[1:]
    penalized[0].record(int(logits[0].argmax()))
    ids, _ = generate.greedy_adjusted(logits, penalized)
    assert ids == generate.adjusted_logits(logits, penalized).argmax(-1).tolist()


def test_one_prompt_is_prefilled_natively_in_chunks_as_a_served_row_is(tiny_pair, monkeypatch):
    """A lone prompt goes through Transformer.prefill_row chunk by chunk (as ContinuousBatch prefills its rows, so a
    request decodes the same alone and served); logits and tokens match the layer-by-layer prefill. Models with
    sliding-window layers decline and take the layers."""
    _, model, _ = tiny_pair
    prompt = list(range(3, 23))
    monkeypatch.setattr(generate, "batch_token_budget", lambda cfg: 8)  # chunks of 8, 8 and 4 positions
    calls = []
    real = model.prefill_row
    monkeypatch.setattr(model, "prefill_row", lambda cache, row, ids, start, embeds=None: calls.append(
        (start, len(ids))) or real(cache, row, ids, start, embeds))
    native = BatchGeneration(model, [prompt], 6)
    monkeypatch.setenv("LIGERO_DECODE_STEP", "layers")  # no native plan: the layers
    layers = BatchGeneration(model, [prompt], 6)
    if model.cfg.sliding_window:
        assert calls[0] == (0, 8)  # asked once, declined
    else:
        assert calls[:3] == [(0, 8), (8, 8), (16, 4)]
    torch.testing.assert_close(native.logits, layers.logits, rtol=1e-4, atol=1e-4)
    assert _run(native).tokens == _run(layers).tokens
