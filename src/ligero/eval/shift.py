"""Internal shift: how far a variant's hidden states move from its baseline's, layer by layer, on the same tokens.

Layer numbering: layer 0 is the embedding output (the input of block 0, after Gemma's sqrt(dim) scaling) and
layer i, for i = 1..n_layers, is the residual stream after block i - 1, so the last layer is the input of the final
norm. A model with L blocks has L + 1 layers, and a change made inside block b first shows at layer b + 1.

Per layer this reports the cosine similarity of the variant's hidden state to the baseline's at each token (mean,
5th percentile and minimum over tokens), the relative L2 error ||variant - base|| / ||base|| over all tokens, and
distribution statistics of both models' hidden states (see layer_stats). Windows are processed one at a time and
statistics accumulate as sums, so memory does not grow with the number of tokens.

Flag rules, each recorded by name on the layers it marks:
  lowest_cosine   one of the 3 layers with the lowest mean cosine (ignored while 1 - cosine < 1e-6: unchanged)
  largest_drop    the layer whose mean cosine falls most below the layer before it (layer 0 compares with 1.0):
                  where an error enters, whereas the lowest cosines are often where it has piled up
  cosine_below    mean cosine < 0.99; on SmolLM2 int8 and int4 stay above 0.999 at every layer, int3 and
                  FP4 W4A4 fall to 0.66-0.97
  outliers        the share of |x| >= 6 moved by at least 1 percentage point and 10 % of the base's share
  max_abs         max |x| grew or shrank by more than 1.5x: a massive activation was clipped or inflated
                  (int3 shrinks SmolLM2's ~22,000 activation at the first token to ~7,000)
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F

from ligero.errors import LigeroError

OUTLIER_THRESHOLD = 6.0  # LLM.int8()'s magnitude threshold for outlier features
N_LOWEST = 3
MOVED = 1e-6  # 1 - cosine below this counts as numerically unchanged
COS_THRESHOLD = 0.99
OUTLIER_SHIFT_ABS, OUTLIER_SHIFT_REL = 0.01, 0.10
MAX_ABS_FACTOR = 1.5
RULES = ["lowest_cosine", "largest_drop", "cosine_below", "outliers", "max_abs"]


# --- hidden states ---------------------------------------------------------------------------------


@torch.inference_mode()
def window_hidden(model, window: list[int]) -> list[torch.Tensor]:
    """Hidden states of one window: n_layers + 1 tensors [T, C] (layer 0 = embeddings; see the module doc)."""
    x = torch.tensor([window], device=model.device)
    _, hidden = model(x, return_hidden=True, last_only=True)  # last_only: skip the vocabulary head for all but one
    return [model.embed_tokens(x)[0]] + [h[0] for h in hidden]


def hidden_states(model, windows: list[list[int]]) -> list[torch.Tensor]:
    """Per layer, the hidden states of all windows' tokens, [sum of window lengths, C] (float32).

    Holds everything in memory; internal_shift streams instead.
    """
    if not windows:
        raise LigeroError("no token windows to compute hidden states on")
    per_window = [window_hidden(model, w) for w in windows]
    return [torch.cat([h[i] for h in per_window]).float() for i in range(len(per_window[0]))]


# --- distribution statistics -----------------------------------------------------------------------


class MomentAccumulator:
    """Streaming mean, variance, excess kurtosis, max |x| and share of |x| >= 6 over every element seen.

    Keeps float64 sums of the powers 1..4 of (x - shift), with shift the mean of the first chunk: central moments
    do not depend on the shift, and centring near the mean avoids the cancellation that raw power sums suffer
    when |mean| is large against the spread.
    """

    def __init__(self) -> None:
        self.count, self.shift = 0, None
        self.sums = [0.0, 0.0, 0.0, 0.0]
        self.max_abs, self.outliers = 0.0, 0

    def update(self, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1).double()
        if x.numel() == 0:
            return
        if self.shift is None:
            self.shift = float(x.mean())
        d = x - self.shift
        d2 = d * d
        for i, s in enumerate((d, d2, d2 * d, d2 * d2)):
            self.sums[i] += float(s.sum())
        self.count += x.numel()
        a = x.abs()
        self.max_abs = max(self.max_abs, float(a.max()))
        self.outliers += int((a >= OUTLIER_THRESHOLD).sum())

    def stats(self) -> dict:
        if not self.count:
            raise LigeroError("no values to compute statistics on")
        m1, m2, m3, m4 = (s / self.count for s in self.sums)  # raw moments of x - shift
        var = max(m2 - m1 * m1, 0.0)
        c4 = m4 - 4 * m1 * m3 + 6 * m1 * m1 * m2 - 3 * m1 ** 4  # fourth central moment
        return {
            "mean": self.shift + m1,
            "variance": var,
            "kurtosis": c4 / var ** 2 - 3 if var > 0 else float("nan"),
            "max_abs": self.max_abs,
            "outlier_fraction": self.outliers / self.count,
            "count": self.count,
        }


def layer_stats(h: torch.Tensor) -> dict:
    """Statistics over all elements of `h`, treated as one population.

    mean; variance (population, ddof = 0); kurtosis in Fisher's (excess) form, E[(x - mean)^4] / variance^2 - 3,
    from population moments (scipy.stats.kurtosis with its defaults), so a normal distribution gives 0; max |x|;
    outlier_fraction, the share of |x| >= 6. That threshold is LLM.int8()'s, set for the inputs of linear layers;
    the residual stream is not normalised (SmolLM2's late layers have a standard deviation near 45 and most
    elements above 6), so compare the share between models rather than read it on its own.
    """
    acc = MomentAccumulator()
    acc.update(h)
    return acc.stats()


# --- shift -----------------------------------------------------------------------------------------


@dataclass
class LayerShift:
    layer: int
    cos_mean: float  # mean over tokens of the per-token cosine similarity
    cos_p5: float
    cos_min: float
    rel_l2: float  # ||variant - base|| / ||base|| over all tokens of the layer
    base: dict  # layer_stats of each model
    variant: dict
    flags: list[str] = field(default_factory=list)


@dataclass
class ShiftResult:
    windows: int
    tokens: int
    layers: list[LayerShift]
    rules: dict  # the thresholds the flags used

    @property
    def flagged(self) -> list[int]:
        return [s.layer for s in self.layers if s.flags]

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> ShiftResult:
        return cls(d["windows"], d["tokens"], [LayerShift(**s) for s in d["layers"]], d["rules"])


def flag_layers(layers: list[LayerShift]) -> None:
    """Set each layer's flags by the rules in the module docstring."""
    moved = [s for s in layers if 1 - s.cos_mean >= MOVED]
    for s in sorted(moved, key=lambda s: s.cos_mean)[:N_LOWEST]:
        s.flags.append("lowest_cosine")
    drops = [(prev - s.cos_mean, s) for prev, s in zip([1.0] + [s.cos_mean for s in layers], layers)]
    drop, worst = max(drops, key=lambda d: d[0])
    if drop >= MOVED:
        worst.flags.append("largest_drop")
    for s in layers:
        if s.cos_mean < COS_THRESHOLD:
            s.flags.append("cosine_below")
        fb, fv = s.base["outlier_fraction"], s.variant["outlier_fraction"]
        if abs(fv - fb) >= max(OUTLIER_SHIFT_ABS, OUTLIER_SHIFT_REL * fb):
            s.flags.append("outliers")
        mb, mv = s.base["max_abs"], s.variant["max_abs"]
        if mb > 0 and mv > 0 and max(mv / mb, mb / mv) > MAX_ABS_FACTOR:
            s.flags.append("max_abs")
    for s in layers:  # a stable order for reports: the rules' order
        s.flags.sort(key=RULES.index)


def baseline_hidden(model, windows: list[list[int]], progress=None) -> list[list[torch.Tensor]]:
    """The baseline's hidden states per window (window_hidden of each), kept so that variants are compared with
    them after the baseline model is released (an audit holds one model at a time)."""
    out = []
    for window in windows:
        out.append([h.float().cpu() for h in window_hidden(model, window)])
        if progress:
            progress()
    return out


def internal_shift(base, variant_model, windows: list[list[int]], progress=None) -> ShiftResult:
    """Compare hidden states layer by layer on the same token windows (one window at a time); flag the layers
    that moved most. `base`: the baseline model, or its baseline_hidden on these windows. `progress()` is called
    once per window."""
    if not windows:
        raise LigeroError("no token windows to compare hidden states on")
    cv = variant_model.cfg
    if isinstance(base, list):
        if len(base) != len(windows):
            raise LigeroError(f"{len(base)} windows of baseline hidden states for {len(windows)} windows")
        base_layers, base_dim = len(base[0]) - 1, base[0][0].shape[-1]
    else:
        base_layers, base_dim = base.cfg.n_layers, base.cfg.dim
    if (base_layers, base_dim) != (cv.n_layers, cv.dim):
        raise LigeroError(f"the models differ in shape ({base_layers} vs {cv.n_layers} layers, dim {base_dim} vs "
                          f"{cv.dim}); internal shift compares a model with a variant of itself")
    n = cv.n_layers + 1
    acc_b, acc_v = [MomentAccumulator() for _ in range(n)], [MomentAccumulator() for _ in range(n)]
    cosines: list[list[torch.Tensor]] = [[] for _ in range(n)]
    err_sq, ref_sq = [0.0] * n, [0.0] * n
    for k, window in enumerate(windows):
        hb = base[k] if isinstance(base, list) else window_hidden(base, window)
        hv = window_hidden(variant_model, window)
        for i in range(n):
            b, v = hb[i].double().cpu(), hv[i].double().cpu()
            cosines[i].append(F.cosine_similarity(v, b, dim=-1))
            err_sq[i] += float(((v - b) ** 2).sum())
            ref_sq[i] += float((b ** 2).sum())
            acc_b[i].update(b)
            acc_v[i].update(v)
        if progress:
            progress()
    layers = []
    for i in range(n):
        cos = torch.cat(cosines[i])
        layers.append(LayerShift(
            layer=i, cos_mean=float(cos.mean()), cos_p5=float(torch.quantile(cos, 0.05)), cos_min=float(cos.min()),
            rel_l2=math.sqrt(err_sq[i] / ref_sq[i]) if ref_sq[i] > 0 else float("nan"),
            base=acc_b[i].stats(), variant=acc_v[i].stats(),
        ))
    flag_layers(layers)
    rules = {"n_lowest": N_LOWEST, "moved": MOVED, "cos_threshold": COS_THRESHOLD,
             "outlier_threshold": OUTLIER_THRESHOLD, "outlier_shift_abs": OUTLIER_SHIFT_ABS,
             "outlier_shift_rel": OUTLIER_SHIFT_REL, "max_abs_factor": MAX_ABS_FACTOR}
    return ShiftResult(len(windows), sum(len(w) for w in windows), layers, rules)
