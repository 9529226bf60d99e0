"""Green lists from a key: which tokens are green after a given context, for every candidate at once.

Instead of a seeded permutation of the vocabulary per position (Kirchenbauer et al.'s construction, ~1 ms per
position at 49k tokens), the key fills a table of 2^20 bits, each green with probability gamma, and an n-gram
(context seed, token) reads bit (hash(token) + hash(seed)) mod 2^20. For a random key every distinct n-gram of a
text then lands on its own random bit (two of a 200-token text share one with probability ~2e-2), so its greenness
is a Bernoulli(gamma) draw independent of the others: the null hypothesis of the detector's z-test. Biasing a batch
costs one add and one gather per logit. A context's green list holds about gamma |V| tokens (Binomial, not exact:
at 49k tokens 25 % +- 0.2 %).

Hashes work on 32-bit values held in int64 tensors: multipliers below 2^31 keep every product below 2^63, so
nothing overflows and torch computes the same bits on every device.
"""

from __future__ import annotations

import hashlib

import torch

from ligero.watermark.keys import WatermarkKey

MASK32 = 0xFFFFFFFF
TABLE_BITS = 20
TABLE_MASK = (1 << TABLE_BITS) - 1
_MULT = 0x45D9F3B  # an odd multiplier of a well-mixing 32-bit integer hash (< 2^31: no int64 overflow)


def mix32(x: torch.Tensor) -> torch.Tensor:
    """A bijective 32-bit integer hash of int64 tensors holding values in [0, 2^32)."""
    x = ((x >> 16) ^ x) * _MULT & MASK32
    x = ((x >> 16) ^ x) * _MULT & MASK32
    return (x >> 16) ^ x


class GreenList:
    """The key's green lists; `mask` covers the ids 0..vocab_size-1 (the model's logits width). A token's greenness
    depends on its id and context only, not on the vocabulary size, so `score` works on any ids."""

    def __init__(self, key: WatermarkKey, vocab_size: int, device: torch.device | str = "cpu"):
        words = hashlib.sha256(b"ligero-watermark:" + key.secret).digest()
        self.k = [int.from_bytes(words[4 * i: 4 * i + 4], "little") for i in range(4)]
        self.settings, self.vocab_size = key.settings, vocab_size
        self.width = key.settings.context_width
        threshold = int(round(key.settings.gamma * 2**32))
        slots = torch.arange(1 << TABLE_BITS, dtype=torch.int64, device=device)
        self.table = mix32(mix32(slots ^ self.k[3]) ^ self.k[2]) < threshold  # [2^20] bool, gamma of them green
        ids = torch.arange(vocab_size, dtype=torch.int64, device=device)
        self.token_hash = self.hash_tokens(ids)  # [V]
        self.token_slot = (self.token_hash & TABLE_MASK).to(torch.int32)  # [V]: int32 halves the batched work

    def hash_tokens(self, ids: torch.Tensor) -> torch.Tensor:
        return mix32(mix32(ids ^ self.k[0]) ^ self.k[1])

    def _combine(self, hashes: torch.Tensor) -> torch.Tensor:
        """[..., w] token hashes -> [...] one accumulated value per context (before the candidate, if self_hash)."""
        seeding = self.settings.seeding
        if seeding == "additive":
            return hashes.sum(-1) & MASK32
        if seeding == "min":
            return hashes.min(-1).values
        return hashes[..., 0]  # skip: the leftmost token of the window

    def _green(self, acc: torch.Tensor, cand_hash: torch.Tensor) -> torch.Tensor:
        """Green flags for accumulated context values `acc` and candidate token hashes (broadcast together)."""
        if self.settings.scheme == "unigram":
            return self.table[cand_hash & TABLE_MASK]
        if self.settings.self_hash:  # the candidate joins the context: min-hash over both, anchored on the candidate
            acc = torch.minimum(acc, cand_hash) if self.settings.seeding == "min" else (acc + cand_hash) & MASK32
        return self.table[(mix32(acc ^ self.k[2]) + cand_hash) & TABLE_MASK]

    def context_values(self, contexts: torch.Tensor) -> torch.Tensor:
        """[n, width] context token ids -> [n] accumulated values."""
        return self._combine(self.hash_tokens(contexts))

    def mask(self, contexts: torch.Tensor) -> torch.Tensor:
        """[n, width] context ids (the last `width` tokens before each position) -> bool [n, V]: the green tokens."""
        if self.settings.scheme == "unigram":
            return self.table[self.token_slot].expand(contexts.shape[0], -1)
        if self.settings.self_hash:
            return self._green(self.context_values(contexts)[:, None], self.token_hash[None, :])
        # The same bits as _green, in int32: (a + b) mod 2^20 only needs each term mod 2^20.
        offset = (mix32(self.context_values(contexts) ^ self.k[2]) & TABLE_MASK).to(torch.int32)
        return self.table[(offset[:, None] + self.token_slot[None, :]) & TABLE_MASK]

    def score(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """A token sequence [T] -> (green flags of positions width..T-1, their n-gram keys [T - width, width + 1]:
        context and token, for de-duplication)."""
        w = self.width
        if w == 0:
            return self._green(torch.zeros_like(tokens), self.hash_tokens(tokens)), tokens[:, None]
        grams = tokens.unfold(0, w + 1, 1)  # [T - w, w + 1]: each position's context and itself
        acc = self.context_values(grams[:, :w])
        return self._green(acc, self.hash_tokens(grams[:, w])), grams
