"""Quality against the baseline (ΔPPL, KL, same top token) equals the plain full-window computation, though the
vocabulary head runs a block of positions at a time."""

import math

import pytest
import torch
import torch.nn.functional as F

from ligero.eval.metrics.quality import Quality
from ligero.eval.perplexity import make_windows
from ligero.eval.quality import HEAD_ROWS, _row_blocks, base_logprobs, compare_models
from ligero.lab.models import build_model, size_named, tiny_config
from ligero.models.transformer import stored_bytes


def test_row_blocks_cover_every_position_in_near_equal_blocks():
    for n in (1, 7, HEAD_ROWS, HEAD_ROWS + 1, 255, 511, 1000):
        blocks = _row_blocks(n)
        assert [i for b in blocks for i in range(b.start, b.stop)] == list(range(n))
        sizes = [b.stop - b.start for b in blocks]
        assert max(sizes) <= HEAD_ROWS + 1 and (n <= HEAD_ROWS or min(sizes) >= HEAD_ROWS // 2)


@torch.inference_mode()
def test_blockwise_quality_equals_the_full_window_computation():
    cfg = tiny_config(size_named("test"), vocab_size=300, seq_len=256)
    base, variant = build_model(cfg, seed=0).eval(), build_model(cfg, seed=1).eval()
    ids = torch.randint(0, 300, (700,), generator=torch.Generator().manual_seed(0)).tolist()
    windows = make_windows(ids, 200)
    nll_b = nll_q = 0.0
    kl, agree = [], 0
    for w in windows:  # the reference: whole [T, V] log-probs of both models
        x = torch.tensor([w])
        lb, lq = (F.log_softmax(m(x[:, :-1])[0].float(), -1) for m in (base, variant))
        t = x[0, 1:, None]
        nll_b, nll_q = nll_b - float(lb.gather(-1, t).sum()), nll_q - float(lq.gather(-1, t).sum())
        kl.append((lb.exp() * (lb - lq)).sum(-1))
        agree += int((lb.argmax(-1) == lq.argmax(-1)).sum())
    count = len(windows) * 199
    with_models = compare_models(base, variant, ids, ctx=200)
    stored = base_logprobs(base, windows)
    with_stored = compare_models(None, variant, ids, ctx=200, base_lp=stored, base_bytes=stored_bytes(base))
    for res in (with_models, with_stored):
        assert res.tokens == count
        assert res.ppl_base == pytest.approx(math.exp(nll_b / count), rel=1e-5)
        assert res.ppl == pytest.approx(math.exp(nll_q / count), rel=1e-5)
        assert res.kld == pytest.approx(float(torch.cat(kl).mean()), rel=1e-4)
        assert res.top1_agreement == agree / count
    same = compare_models(None, base, ids, ctx=200, base_lp=stored, base_bytes=stored_bytes(base))
    assert same.kld == 0 and same.delta_ppl_pct == 0 and same.top1_agreement == 1  # the same blocks, bit for bit
    # ΔPPL's test units: per-block mean NLL differences whose token-weighted mean is log(ppl / ppl_base)
    sizes = [b.stop - b.start for b in _row_blocks(199)] * len(windows)
    blocks = with_stored.nll_diff_blocks
    assert len(blocks) == len(sizes)
    assert sum(d * n for d, n in zip(blocks, sizes)) / count == pytest.approx(
        math.log(with_stored.ppl / with_stored.ppl_base), rel=1e-6)
    assert set(same.nll_diff_blocks) == {0.0}
    comparison = Quality().compare({}, {"capability": with_stored.summary()}, 100)
    (claim,) = Quality().claims(comparison)
    assert claim["delta"] == with_stored.delta_ppl_pct and claim["n"] == len(blocks)
    assert claim["ci"][0] < claim["delta"] < claim["ci"][1] and 0 <= claim["p_value"] <= 1
    assert Quality().claims(Quality().compare({}, {"capability": {"delta_ppl_pct": 1.0}}, 100)) == []


def test_a_collapsed_variant_is_labelled_not_given_a_seven_digit_percentage():
    from ligero.eval.metrics.quality import delta_ppl_text

    assert delta_ppl_text(1.234) == "+1.23 %" and delta_ppl_text(-0.5, unit="") == "-0.50"
    assert delta_ppl_text(75_086_520.0) == "collapsed (PPL x7.5e+05)"
