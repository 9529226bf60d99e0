"""Tokenizer: a `tokenizers` fast tokenizer plus the few facts generation needs (BOS/EOS, chat template).

BOS is added explicitly (add_bos), never by the tokenizer's post-processor, so every source behaves the same.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path

from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer as FastTokenizer

from ligero.errors import LigeroError
from ligero.io.hf_folder import read_json_object

TOKENIZER_FILE, TOKENIZER_META = "tokenizer.json", "tokenizer_meta.json"


@dataclass
class TokenizerMeta:
    bos_id: int | None = None
    eos_ids: list[int] = field(default_factory=list)
    pad_id: int | None = None
    add_bos: bool = False
    chat_template: str | None = None


class Tokenizer:
    def __init__(self, fast: FastTokenizer, meta: TokenizerMeta):
        self.fast, self.meta = fast, meta

    @property
    def sha256(self) -> str:
        """What identifies this tokenizer: the sha256 of its serialised vocabulary, merges and rules."""
        if not hasattr(self, "_sha256"):
            self._sha256 = hashlib.sha256(self.fast.to_str().encode("utf-8")).hexdigest()
        return self._sha256

    @property
    def vocab_size(self) -> int:
        return self.fast.get_vocab_size(with_added_tokens=True)

    @property
    def eos_ids(self) -> list[int]:
        return self.meta.eos_ids

    @property
    def pad_id(self) -> int:
        if self.meta.pad_id is not None:
            return self.meta.pad_id
        return self.meta.eos_ids[0] if self.meta.eos_ids else 0

    def encode(self, text: str, add_bos: bool | None = None) -> list[int]:
        ids = self.fast.encode(text, add_special_tokens=False).ids
        if (self.meta.add_bos if add_bos is None else add_bos) and self.meta.bos_id is not None:
            ids = [self.meta.bos_id] + ids
        return ids

    def decode(self, ids: list[int], skip_special: bool = True) -> str:
        return self.fast.decode(list(ids), skip_special_tokens=skip_special)

    def apply_chat_template(self, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        """Render the model's own chat template (from GGUF metadata or tokenizer_config.json)."""
        if not self.meta.chat_template:
            raise LigeroError("this model has no chat template (it is probably a base model); drop --chat")

        def raise_exception(message: str):
            raise LigeroError(f"chat template rejected the messages: {message}")

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals.update(raise_exception=raise_exception, strftime_now=lambda f: datetime.now().strftime(f))
        tok = lambda i: self.fast.id_to_token(i) if i is not None else ""  # noqa: E731
        return env.from_string(self.meta.chat_template).render(
            messages=messages,
            add_generation_prompt=add_generation_prompt,
            bos_token=tok(self.meta.bos_id),
            eos_token=tok(self.meta.eos_ids[0]) if self.meta.eos_ids else "",
        )

    # --- persistence -------------------------------------------------------------------------------
    def save(self, folder: Path) -> None:
        self.fast.save(str(Path(folder) / TOKENIZER_FILE))
        (Path(folder) / TOKENIZER_META).write_text(json.dumps(asdict(self.meta), indent=1))

    @classmethod
    def load(cls, folder: Path) -> "Tokenizer":
        meta = json.loads((Path(folder) / TOKENIZER_META).read_text())
        return cls(FastTokenizer.from_file(str(Path(folder) / TOKENIZER_FILE)), TokenizerMeta(**meta))


def tokenizer_from_gguf(path: Path, meta: dict) -> Tokenizer:
    """Convert a GGUF's embedded vocabulary to a fast tokenizer (transformers' converters, run once)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        from transformers import AutoTokenizer  # seconds to import, needed only to convert a GGUF (once)

        hf_tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    except Exception as exc:  # transformers raises many types for unknown tokenizer models
        raise LigeroError(
            f"cannot build a tokenizer from {path} ({type(exc).__name__}: {str(exc).splitlines()[0][:120]}); "
            "use a Hugging Face folder with tokenizer.json instead"
        ) from None
    eos = meta.get("tokenizer.ggml.eos_token_id")
    return Tokenizer(
        hf_tok.backend_tokenizer,
        TokenizerMeta(
            bos_id=meta.get("tokenizer.ggml.bos_token_id"),
            eos_ids=[int(eos)] if eos is not None else [],
            pad_id=meta.get("tokenizer.ggml.padding_token_id"),
            add_bos=bool(meta.get("tokenizer.ggml.add_bos_token", False)),
            chat_template=meta.get("tokenizer.chat_template"),
        ),
    )


def tokenizer_from_hf_folder(folder: Path, hf_config: dict) -> Tokenizer | None:
    """tokenizer.json + tokenizer_config.json from a Hugging Face folder (None when the folder has none)."""
    folder = Path(folder)
    if not (folder / TOKENIZER_FILE).exists():
        return None
    try:
        fast = FastTokenizer.from_file(str(folder / TOKENIZER_FILE))
    except Exception as exc:  # tokenizers raises a plain Exception for a file it cannot parse
        raise LigeroError(f"{folder / TOKENIZER_FILE} is not a readable tokenizer file "
                          f"({str(exc).splitlines()[0][:100]}); replace it with the model's original") from None
    tcfg_path = folder / "tokenizer_config.json"
    tcfg = read_json_object(tcfg_path) if tcfg_path.exists() else {}

    def token_id(value) -> int | None:
        if isinstance(value, dict):
            value = value.get("content")
        return fast.token_to_id(value) if isinstance(value, str) else None

    bos = token_id(tcfg.get("bos_token")) if tcfg.get("bos_token") else hf_config.get("bos_token_id")
    eos = hf_config.get("eos_token_id")
    eos_ids = eos if isinstance(eos, list) else ([eos] if eos is not None else [])
    if token_id(tcfg.get("eos_token")) is not None and token_id(tcfg.get("eos_token")) not in eos_ids:
        eos_ids = [token_id(tcfg.get("eos_token"))] + eos_ids
    if "add_bos_token" in tcfg:
        add_bos = bool(tcfg["add_bos_token"])
    else:  # ask the post-processor whether it prepends BOS
        add_bos = bos is not None and fast.encode("a", add_special_tokens=True).ids[:1] == [bos]
    template = tcfg.get("chat_template")
    if template is None and (folder / "chat_template.jinja").exists():
        template = (folder / "chat_template.jinja").read_text()
    return Tokenizer(
        fast,
        TokenizerMeta(bos_id=bos, eos_ids=eos_ids, pad_id=token_id(tcfg.get("pad_token")), add_bos=add_bos,
                      chat_template=template if isinstance(template, str) else None),
    )
