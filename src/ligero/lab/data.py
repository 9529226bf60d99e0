"""Training data for the labs: a small byte-level BPE trained on the training split, the splits as token streams,
and batches that depend only on (seed, step), so every arm of an experiment and a resumed run see the same data.

The splits are the Wikipedia passages of ligero.eval.data (deduplicated, assigned to train / calib / eval by the
hash of each passage, so training never sees an evaluation passage); their sha256 go into every run's log.
"""

from __future__ import annotations

import functools
import hashlib
from dataclasses import dataclass

import numpy as np
import torch

from ligero.errors import LigeroError
from ligero.eval.data import PASSAGE_SEPARATOR, TextSplit, wikipedia_split
from ligero.io.tokenizer import Tokenizer, TokenizerMeta
from ligero.paths import cache_root

END_OF_TEXT = "<|endoftext|>"  # id 0: separates passages in the token stream
MIN_VOCAB, MAX_VOCAB = 260, 65536  # 256 bytes + the special token and a few merges; ids fit in uint16


def lab_cache():
    folder = cache_root() / "lab"
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def train_tokenizer(split: TextSplit, vocab_size: int) -> Tokenizer:
    """A byte-level BPE of `vocab_size` entries trained on `split` (cached by the text's sha256 and the size).
    Byte-level: any text encodes, and decoding gives it back exactly. A 49k vocabulary (SmolLM2's) would put most
    of a tiny model's parameters in its embedding; 4k-8k leaves them to the layers."""
    from tokenizers import Tokenizer as FastTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    if not MIN_VOCAB <= vocab_size <= MAX_VOCAB:
        raise LigeroError(f"vocabulary size {vocab_size} is out of range; use {MIN_VOCAB} to {MAX_VOCAB}")
    path = lab_cache() / f"bpe-{vocab_size}-{split.sha256[:16]}.json"
    if path.exists():
        fast = FastTokenizer.from_file(str(path))
    else:
        fast = FastTokenizer(models.BPE())
        fast.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        fast.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[END_OF_TEXT], show_progress=False,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
        fast.train_from_iterator(split.text.split(PASSAGE_SEPARATOR), trainer)
        tmp = path.with_suffix(".tmp")
        fast.save(str(tmp))
        tmp.replace(path)
    eot = fast.token_to_id(END_OF_TEXT)
    return Tokenizer(fast, TokenizerMeta(bos_id=None, eos_ids=[eot], pad_id=eot, add_bos=False))


def tokenizer_sha256(tokenizer: Tokenizer) -> str:
    return tokenizer.sha256


def token_stream(split: TextSplit, tokenizer: Tokenizer) -> np.ndarray:
    """The split's passages as one stream of token ids (uint16), END_OF_TEXT between passages; cached."""
    path = lab_cache() / f"tokens-{split.sha256[:16]}-{tokenizer_sha256(tokenizer)[:16]}.npy"
    if path.exists():
        return np.load(path)
    eot = tokenizer.eos_ids[0]
    ids: list[int] = []
    for passage in split.text.split(PASSAGE_SEPARATOR):
        ids.extend(tokenizer.encode(passage))
        ids.append(eot)
    stream = np.asarray(ids, dtype=np.uint16)
    tmp = path.with_suffix(".tmp.npy")
    np.save(tmp, stream)
    tmp.replace(path)
    return stream


@dataclass
class LabData:
    """The training and evaluation streams of one tokenizer, with what identifies them."""

    tokenizer: Tokenizer
    train: torch.Tensor  # int64 token ids
    eval: torch.Tensor
    provenance: dict

    @classmethod
    @functools.lru_cache(maxsize=2)  # a lab's runs share one tokenizer: its streams are read once per process
    def load(cls, vocab_size: int) -> "LabData":
        train_split, eval_split = wikipedia_split("train"), wikipedia_split("eval")
        tok = train_tokenizer(train_split, vocab_size)
        train = torch.from_numpy(token_stream(train_split, tok).astype(np.int64))
        evals = torch.from_numpy(token_stream(eval_split, tok).astype(np.int64))
        provenance = {"train_split": train_split.describe(), "eval_split": eval_split.describe(),
                      "train_tokens": int(train.numel()), "eval_tokens": int(evals.numel()),
                      "vocab_size": tok.vocab_size, "tokenizer_sha256": tokenizer_sha256(tok)}
        return cls(tok, train, evals, provenance)

    def batch(self, seed: int, step: int, rows: int, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Inputs and targets [rows, seq_len] of one optimizer step: windows at random offsets of the training
        stream, drawn from a generator seeded by (seed, step) alone."""
        n = self.train.numel() - seq_len - 1
        if n < 1:
            raise LigeroError(f"the training stream ({self.train.numel()} tokens) is shorter than one window")
        g = torch.Generator().manual_seed(_mix(seed, step))
        starts = torch.randint(0, n, (rows,), generator=g)
        windows = self.train[starts[:, None] + torch.arange(seq_len + 1)]
        return windows[:, :-1], windows[:, 1:]

    def eval_windows(self, seq_len: int, max_tokens: int) -> torch.Tensor:
        """Non-overlapping windows [N, seq_len + 1] covering the first `max_tokens` predicted tokens of the
        evaluation stream (the same for every model of a tokenizer)."""
        n = min(max_tokens // seq_len, (self.eval.numel() - 1) // seq_len)
        if n < 1:
            raise LigeroError(f"the evaluation stream is shorter than one window of {seq_len} tokens")
        starts = torch.arange(n) * seq_len
        return self.eval[starts[:, None] + torch.arange(seq_len + 1)]


def _mix(seed: int, step: int) -> int:
    digest = hashlib.sha256(f"{seed}:{step}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)
