"""The labs' data: a BPE trained on the training split that round-trips the evaluation text, splits that do not
share a passage, and batches that depend only on (seed, step)."""

import pytest
import torch

from ligero.errors import LigeroError
from ligero.eval.data import PASSAGE_SEPARATOR, wikipedia_split
from ligero.lab.data import LabData, train_tokenizer

VOCAB = 512


@pytest.fixture(scope="module")
def data():
    return LabData.load(VOCAB)


def test_the_tokenizer_round_trips_the_evaluation_text(data):
    text = wikipedia_split("eval").text
    ids = data.tokenizer.encode(text)
    assert data.tokenizer.vocab_size == VOCAB and max(ids) < VOCAB
    assert data.tokenizer.decode(ids) == text
    assert len(ids) < 0.6 * len(text.encode("utf-8"))  # merges learned: well under a token per byte
    assert data.tokenizer.decode(data.tokenizer.encode("naïve café — 東京")) == "naïve café — 東京"  # byte-level


def test_training_never_sees_an_evaluation_passage(data):
    train = set(wikipedia_split("train").text.split(PASSAGE_SEPARATOR))
    evals = set(wikipedia_split("eval").text.split(PASSAGE_SEPARATOR))
    assert not train & evals
    p = data.provenance
    assert p["train_split"]["sha256"] != p["eval_split"]["sha256"] and p["train_tokens"] > 10 * p["eval_tokens"] / 2


def test_batches_depend_on_seed_and_step_only(data):
    x, y = data.batch(seed=0, step=7, rows=4, seq_len=16)
    assert x.shape == y.shape == (4, 16) and torch.equal(x[:, 1:], y[:, :-1])
    again, _ = data.batch(seed=0, step=7, rows=4, seq_len=16)
    assert torch.equal(x, again)
    assert not torch.equal(x, data.batch(seed=0, step=8, rows=4, seq_len=16)[0])
    assert not torch.equal(x, data.batch(seed=1, step=7, rows=4, seq_len=16)[0])
    w = data.eval_windows(seq_len=16, max_tokens=64)
    assert w.shape == (4, 17) and torch.equal(w[1, 0], w[0, 16])  # non-overlapping predicted tokens


def test_a_vocabulary_out_of_range_is_named():
    with pytest.raises(LigeroError, match="vocabulary size 100 is out of range"):
        train_tokenizer(wikipedia_split("train"), 100)
