"""Internal shift: exact statistics on hand-made tensors, streaming = one-shot, and a perturbed block is found."""

import copy
import json

import numpy as np
import pytest
import scipy.stats
import torch

from ligero.errors import LigeroError
from ligero.eval.shift import (
    MomentAccumulator,
    ShiftResult,
    hidden_states,
    internal_shift,
    layer_stats,
    window_hidden,
)
from ligero.models.config import ModelConfig
from ligero.models.transformer import Transformer


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    cfg = ModelConfig(arch="llama", vocab_size=96, dim=32, n_layers=5, n_heads=4, n_kv_heads=2, head_dim=8,
                      ffn_dim=48, max_seq_len=64)
    return Transformer(cfg).eval()


def windows(n=3, length=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 96, (n, length), generator=g).tolist()


def test_layer_stats_match_numpy_and_scipy():
    x = torch.tensor([[-7.0, 0.5, 1.0], [2.0, 6.0, -1.5], [0.0, 3.0, 10.0]])
    s = layer_stats(x)
    v = x.double().numpy().ravel()
    assert s["mean"] == pytest.approx(v.mean(), abs=1e-12)
    assert s["variance"] == pytest.approx(v.var(), rel=1e-12)  # population variance
    assert s["kurtosis"] == pytest.approx(scipy.stats.kurtosis(v), rel=1e-10)  # Fisher (excess), biased
    assert s["max_abs"] == 10.0
    assert s["outlier_fraction"] == pytest.approx(3 / 9)  # -7, 6 (>= counts) and 10
    assert s["count"] == 9


def test_kurtosis_of_known_distributions():
    # Two-point +-1: variance 1, kurtosis 1 - 3 = -2; a large normal sample: excess kurtosis near 0.
    s = layer_stats(torch.tensor([1.0, -1.0] * 50))
    assert (s["mean"], s["variance"], s["kurtosis"]) == pytest.approx((0.0, 1.0, -2.0), abs=1e-12)
    g = torch.Generator().manual_seed(0)
    assert abs(layer_stats(torch.randn(200_000, generator=g))["kurtosis"]) < 0.05


def test_streaming_equals_one_shot_even_far_from_zero():
    g = torch.Generator().manual_seed(1)
    chunks = [1e4 + torch.randn(n, 8, generator=g) ** 3 for n in (5, 40, 1, 17)]  # large mean, heavy tails
    acc = MomentAccumulator()
    for c in chunks:
        acc.update(c)
    whole = torch.cat(chunks).double().numpy().ravel()
    stream, once = acc.stats(), layer_stats(torch.cat(chunks))
    for key in ("mean", "variance", "kurtosis", "max_abs", "outlier_fraction", "count"):
        assert stream[key] == pytest.approx(once[key], rel=1e-9)
    assert stream["variance"] == pytest.approx(whole.var(), rel=1e-9)
    assert stream["kurtosis"] == pytest.approx(scipy.stats.kurtosis(whole), rel=1e-9)


def test_hidden_states_layout(tiny):
    ws = windows(2, 10)
    hs = hidden_states(tiny, ws)
    assert len(hs) == tiny.cfg.n_layers + 1 and all(h.shape == (20, 32) for h in hs)
    assert torch.equal(hs[0][:10], tiny.embed_tokens(torch.tensor([ws[0]]))[0])  # layer 0 = embeddings
    with torch.no_grad():
        logits = tiny(torch.tensor([ws[1]]))
    assert torch.allclose(tiny.lm_head(tiny.norm(hs[-1][10:])), logits[0], atol=1e-5)  # last = final-norm input
    assert len(window_hidden(tiny, ws[0])) == len(hs)


def test_identical_models_do_not_move(tiny):
    res = internal_shift(tiny, copy.deepcopy(tiny), windows())
    assert len(res.layers) == tiny.cfg.n_layers + 1 and res.tokens == 48 and res.windows == 3
    for s in res.layers:
        assert s.cos_mean == pytest.approx(1, abs=1e-12) and s.cos_min == pytest.approx(1, abs=1e-12)
        assert s.rel_l2 == 0.0
        assert s.base == s.variant
    assert res.flagged == []


def test_perturbed_block_is_flagged(tiny):
    variant = copy.deepcopy(tiny)
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        w = variant.layers[2].mlp.down_proj.weight
        w.add_(torch.randn(w.shape, generator=g) * w.std())
    res = internal_shift(tiny, variant, windows())
    by_layer = {s.layer: s for s in res.layers}
    for i in (0, 1, 2):  # embeddings and the blocks before the perturbed one are untouched
        assert by_layer[i].rel_l2 == 0.0 and not by_layer[i].flags
    assert by_layer[3].cos_mean < 0.999 and by_layer[3].rel_l2 > 0  # block 2's output is layer 3
    assert "largest_drop" in by_layer[3].flags
    assert sum("lowest_cosine" in s.flags for s in res.layers) == 3


def test_flag_rules_on_outliers_and_max_abs(tiny):
    # Scaling the embeddings by 10 pushes elements over 6 and multiplies max |x|: both distribution flags fire.
    variant = copy.deepcopy(tiny)
    with torch.no_grad():
        variant.embed.weight.mul_(10)
    layer0 = internal_shift(tiny, variant, windows()).layers[0]
    assert layer0.cos_mean == pytest.approx(1, abs=1e-9)  # same direction ...
    assert {"outliers", "max_abs"} <= set(layer0.flags)  # ... but a different scale


def test_round_trips_through_json(tiny):
    variant = copy.deepcopy(tiny)
    with torch.no_grad():
        variant.layers[0].attn.o_proj.weight.mul_(1.5)
    res = internal_shift(tiny, variant, windows(2))
    again = ShiftResult.from_dict(json.loads(json.dumps(res.to_dict())))
    assert again == res and again.flagged == res.flagged


def test_bad_inputs(tiny):
    with pytest.raises(LigeroError):
        internal_shift(tiny, tiny, [])
    other = Transformer(ModelConfig(arch="llama", vocab_size=96, dim=32, n_layers=2, n_heads=4, n_kv_heads=2,
                                    head_dim=8, ffn_dim=48, max_seq_len=64))
    with pytest.raises(LigeroError, match="differ in shape"):
        internal_shift(tiny, other, windows(1))
    assert np.isnan(layer_stats(torch.ones(4))["kurtosis"])  # no spread: kurtosis undefined
