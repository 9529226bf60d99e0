"""Detection: count green tokens, test them against the share gamma that unmarked text has by chance.

Each scored position is a (context, token) n-gram; an n-gram seen before in the text is scored once (Kirchenbauer et
al. 2023, "On the Reliability of Watermarks": repeated text would otherwise count the same coin flip again and again,
inflating z on repetitive human text). The first `context_width` tokens have no full context and are not scored.
Under the null (text written without the key) the T scored n-grams are T independent Bernoulli(gamma) draws, so
z = (G - gamma T) / sqrt(T gamma (1 - gamma)) and the exact one-sided p-value is P(Binomial(T, gamma) >= G).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
from scipy.stats import binom

from ligero.errors import LigeroError
from ligero.watermark.greenlist import GreenList
from ligero.watermark.keys import WatermarkKey

Z_THRESHOLD = 4.0  # Kirchenbauer et al.'s threshold: a normal-tail false-positive rate of 3.2e-5
MIN_SCORED = 16  # below this many scored tokens a verdict means little (z = 4 needs >= 6 greens of 16 at gamma 0.25)


@dataclass(frozen=True)
class Detection:
    key_id: str
    tokens: int  # tokens in the text
    scored: int  # T: distinct (context, token) n-grams scored
    repeated: int  # positions skipped as repeats of an n-gram already scored
    green: int  # G
    gamma: float
    z: float
    p_value: float  # exact: P(Binomial(T, gamma) >= G)
    p_normal: float  # the z-score's normal tail (what papers quote)
    z_threshold: float
    watermarked: bool  # z >= z_threshold

    def to_dict(self) -> dict:
        return asdict(self)

    def summary(self) -> str:
        verdict = "watermarked" if self.watermarked else "not watermarked"
        return (f"{verdict}: z = {self.z:.2f} (threshold {self.z_threshold:g}), p = {self.p_value:.3g}; "
                f"{self.green} of {self.scored} scored tokens green (expected {self.gamma:.0%} without the "
                f"watermark; {self.repeated} repeats skipped), key {self.key_id}")


def z_score(green: int, scored: int, gamma: float) -> float:
    return (green - gamma * scored) / math.sqrt(scored * gamma * (1 - gamma))


class Detector:
    def __init__(self, key: WatermarkKey, z_threshold: float = Z_THRESHOLD, min_scored: int = MIN_SCORED,
                 ignore_repeated: bool = True):
        if min_scored < 1:
            raise LigeroError(f"the detector's minimum must be at least 1 scored token, got {min_scored}")
        self.key, self.z_threshold, self.min_scored = key, z_threshold, min_scored
        self.ignore_repeated = ignore_repeated
        self.green = GreenList(key, 1)

    def flags(self, tokens: list[int] | torch.Tensor) -> torch.Tensor:
        """Green flags of the positions that count (repeats dropped): bool [T]."""
        ids = torch.as_tensor(tokens, dtype=torch.int64)
        if ids.numel() <= self.green.width:
            return torch.zeros(0, dtype=torch.bool)
        green, grams = self.green.score(ids)
        if self.ignore_repeated:
            _, inverse = torch.unique(grams, dim=0, return_inverse=True)
            first = torch.full((int(inverse.max()) + 1,), grams.shape[0], dtype=torch.int64)
            first = first.scatter_reduce(0, inverse, torch.arange(grams.shape[0]), reduce="amin")
            green = green[first.sort().values]
        return green

    def detect(self, tokens: list[int] | torch.Tensor, check_length: bool = True) -> Detection:
        n = len(tokens)
        flags = self.flags(tokens)
        scored, green = int(flags.numel()), int(flags.sum())
        if scored < self.min_scored:
            if check_length:
                raise LigeroError(f"the text has {scored} scorable tokens ({n} in all, repeats and the first "
                                  f"{self.green.width} without context excluded); the detector needs at least "
                                  f"{self.min_scored}: give a longer text (about 200 tokens detect reliably)")
            if scored == 0:
                return Detection(self.key.key_id, n, 0, max(0, n - self.green.width), 0,
                                 self.key.settings.gamma, 0.0, 1.0, 0.5, self.z_threshold, False)
        gamma = self.key.settings.gamma
        z = z_score(green, scored, gamma)
        return Detection(self.key.key_id, n, scored, max(0, n - self.green.width) - scored, green, gamma, z,
                         float(binom.sf(green - 1, scored, gamma)), 0.5 * math.erfc(z / math.sqrt(2)),
                         self.z_threshold, z >= self.z_threshold)


def detect_tokens(tokens: list[int], key: WatermarkKey, **options) -> Detection:
    return Detector(key, **options).detect(tokens)


def detect_text(text: str, tokenizer, key: WatermarkKey, **options) -> Detection:
    """Tokenize `text` as the model does (no BOS) and detect."""
    return Detector(key, **options).detect(tokenizer.encode(text, add_bos=False))
