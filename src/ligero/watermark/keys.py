"""Watermark keys: a secret, the scheme's settings, and the tokenizer they belong to, in one JSON file.

The secret never leaves the key file: what servers, stores and responses carry is the key id, a digest of the secret
that names the key without revealing it. A key is bound to one tokenizer (its sha256): green lists are lists of token
ids, so a text tokenized differently scores as noise; using a key with another tokenizer is an error.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import secrets
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import ClassVar

from ligero.errors import LigeroError

KEY_FORMAT = "ligero-watermark-key"
SCHEMES = ("kgw", "unigram")  # Kirchenbauer et al.'s context-seeded green lists; Zhao et al.'s fixed one
SEEDINGS = ("additive", "min", "skip")  # how the context's token hashes combine into the green list's seed
SECRET_BYTES = 32
MAX_CONTEXT_WIDTH = 8


@dataclass(frozen=True)
class WatermarkSettings:
    """A watermark's public settings.

    kgw: the green list of each position is seeded by the `context_width` tokens before it, combined by `seeding`
    (additive: Kirchenbauer et al.'s LeftHash at width 1; min: a min-hash, robust to edits of the non-minimal
    tokens; skip: the leftmost token only); `self_hash` also feeds the candidate token itself into the seed
    (the SelfHash scheme of "On the Reliability of Watermarks", with min seeding and width 3-4). unigram: one fixed
    green list (context_width 0). A fraction `gamma` of the vocabulary is green; generation adds `delta` to green
    logits."""

    scheme: str = "kgw"
    gamma: float = 0.25
    delta: float = 2.0
    context_width: int = 1
    seeding: str = "additive"
    self_hash: bool = False

    def __post_init__(self) -> None:
        if self.scheme not in SCHEMES:
            raise LigeroError(f"unknown watermark scheme '{self.scheme}'; use one of: {', '.join(SCHEMES)}")
        if self.seeding not in SEEDINGS:
            raise LigeroError(f"unknown seeding '{self.seeding}'; use one of: {', '.join(SEEDINGS)}")
        if not 0 < self.gamma < 1:
            raise LigeroError(f"gamma (the green share of the vocabulary) must be between 0 and 1, got {self.gamma}")
        if not 0 <= self.delta <= 100:
            raise LigeroError(f"delta (the bias added to green logits) must be between 0 and 100, got {self.delta}")
        if self.scheme == "unigram" and (self.context_width or self.self_hash):
            raise LigeroError("the unigram scheme has one fixed green list: context_width 0 and no self_hash")
        if self.scheme == "kgw" and not 1 <= self.context_width <= MAX_CONTEXT_WIDTH:
            raise LigeroError(f"kgw needs a context width of 1 to {MAX_CONTEXT_WIDTH} tokens, got "
                              f"{self.context_width}")

    @classmethod
    def preset(cls, name: str, gamma: float = 0.25, delta: float = 2.0) -> WatermarkSettings:
        """lefthash (Kirchenbauer et al. 2023's default), selfhash (their reliability paper's robust variant,
        width 4) or unigram (Zhao et al. 2023)."""
        presets = {"lefthash": dict(scheme="kgw", context_width=1, seeding="additive"),
                   "selfhash": dict(scheme="kgw", context_width=3, seeding="min", self_hash=True),
                   "unigram": dict(scheme="unigram", context_width=0, seeding="additive")}
        if name not in presets:
            raise LigeroError(f"unknown watermark preset '{name}'; use one of: {', '.join(presets)}")
        return cls(gamma=gamma, delta=delta, **presets[name])

    def describe(self) -> str:
        if self.scheme == "unigram":
            return f"unigram, gamma {self.gamma:g}, delta {self.delta:g}"
        return (f"kgw ({self.seeding} seeding over {self.context_width} token(s)"
                f"{' + self-hash' if self.self_hash else ''}), gamma {self.gamma:g}, delta {self.delta:g}")


@dataclass(frozen=True)
class WatermarkKey:
    secret: bytes
    settings: WatermarkSettings
    tokenizer_sha256: str
    vocab_size: int
    model: str  # the model the key was made for (detection's default tokenizer source)
    created: str = ""
    version: ClassVar[int] = 1

    @property
    def key_id(self) -> str:
        """16 hex digits naming the key; a one-way digest, so it reveals nothing of the secret."""
        return "wm-" + hashlib.sha256(b"ligero-watermark-key-id:" + self.secret).hexdigest()[:16]

    def check_tokenizer(self, tokenizer, model: str, source: str = "the key") -> None:
        """Refuse a tokenizer the key was not made for (its green lists would score as noise)."""
        digest = tokenizer.sha256
        if digest != self.tokenizer_sha256:
            raise LigeroError(f"{source} was made for the tokenizer of {self.model} (sha256 "
                              f"{self.tokenizer_sha256[:12]}, {self.vocab_size} tokens), but {model} has another "
                              f"one (sha256 {digest[:12]}, {tokenizer.vocab_size} tokens); use --model {self.model} "
                              f"or make a key for {model} with `ligero watermark keygen`")

    def to_dict(self) -> dict:
        return {"format": KEY_FORMAT, "version": self.version, "key_id": self.key_id, "secret": self.secret.hex(),
                **dataclasses.asdict(self.settings),
                "tokenizer": {"sha256": self.tokenizer_sha256, "vocab_size": self.vocab_size, "model": self.model},
                "created": self.created}

    def public(self) -> dict:
        """What may be shown, logged or stored: everything but the secret."""
        d = self.to_dict()
        del d["secret"]
        return d


def new_key(settings: WatermarkSettings, tokenizer, model: str) -> WatermarkKey:
    return WatermarkKey(secrets.token_bytes(SECRET_BYTES), settings, tokenizer.sha256,
                        tokenizer.vocab_size, model, datetime.now(UTC).isoformat(timespec="seconds"))


def save_key(key: WatermarkKey, path: str | Path) -> Path:
    """Write the key readable by its owner only; refuses to overwrite an existing key (its marks would be lost)."""
    path = Path(path)
    if path.exists():
        raise LigeroError(f"{path} already exists; a new key would orphan what the old one marked: choose another "
                          "path or delete the old key first")
    if not path.parent.is_dir():
        raise LigeroError(f"the folder {path.parent} does not exist; create it first")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(key.to_dict(), f, indent=1)
        f.write("\n")
    return path


def load_key(path: str | Path) -> WatermarkKey:
    path = Path(path)
    fix = "create one with `ligero watermark keygen --out FILE`"
    if not path.is_file():
        raise LigeroError(f"watermark key file {path} does not exist; {fix}")
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise LigeroError(f"{path} is not a watermark key (not JSON: {exc}); {fix}") from None
    if not isinstance(d, dict) or d.get("format") != KEY_FORMAT:
        raise LigeroError(f"{path} is not a Ligero watermark key (no \"format\": \"{KEY_FORMAT}\"); {fix}")
    if d.get("version") != WatermarkKey.version:
        raise LigeroError(f"{path} is a version {d.get('version')} watermark key; this Ligero reads version "
                          f"{WatermarkKey.version}")
    try:
        secret = bytes.fromhex(d["secret"])
        names = {f.name for f in dataclasses.fields(WatermarkSettings)}
        settings = WatermarkSettings(**{k: d[k] for k in names})
        tok = d["tokenizer"]
        key = WatermarkKey(secret, settings, str(tok["sha256"]), int(tok["vocab_size"]), str(tok["model"]),
                           str(d.get("created", "")))
    except LigeroError as exc:
        raise LigeroError(f"{path}: {exc}") from None
    except (KeyError, TypeError, ValueError) as exc:
        raise LigeroError(f"{path} is a malformed watermark key ({type(exc).__name__}: {exc}); {fix}") from None
    if len(secret) < 16:
        raise LigeroError(f"{path} holds a {len(secret)}-byte secret; keys need at least 16 bytes; {fix}")
    if d.get("key_id") != key.key_id:
        raise LigeroError(f"{path} is corrupt: its key_id does not match its secret; restore it from a backup")
    return key
