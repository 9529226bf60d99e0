"""Text splits: deterministic, disjoint, hashed."""

import pytest

from ligero.errors import LigeroError
from ligero.eval.data import PASSAGE_SEPARATOR, load_text, wikipedia_split


def test_splits_are_disjoint_deterministic_and_sized():
    splits = {s: wikipedia_split(s) for s in ("eval", "calib", "train")}
    docs = {s: set(t.text.split(PASSAGE_SEPARATOR)) for s, t in splits.items()}
    assert not docs["eval"] & docs["calib"] and not docs["eval"] & docs["train"] and not docs["calib"] & docs["train"]
    total = sum(t.n_documents for t in splits.values())
    assert total > 12000  # ~12,271 unique paragraphs
    assert 0.07 < splits["eval"].n_documents / total < 0.13
    assert wikipedia_split("eval").sha256 == splits["eval"].sha256


def test_text_file_and_bad_inputs(tmp_path):
    f = tmp_path / "t.txt"
    f.write_text("hello world")
    assert load_text(str(f)).text == "hello world"
    with pytest.raises(LigeroError, match="does not exist"):
        load_text(str(tmp_path / "missing.txt"))
    (tmp_path / "bin.txt").write_bytes(b"\xff\xfe\x00bad")
    with pytest.raises(LigeroError, match="UTF-8"):
        load_text(str(tmp_path / "bin.txt"))
    with pytest.raises(LigeroError, match="unknown split"):
        wikipedia_split("test")
