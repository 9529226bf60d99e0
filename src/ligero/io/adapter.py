"""A LoRA adapter folder (what `ligero finetune` writes) as a model: its base, checked by digest, with the adapters
merged into full-precision weights. So an adapter goes wherever `--model` does (generate, eval, quantize, export,
serve, audit); quantizing it gives the fine-tuned-then-quantized model.

The folder holds adapter.safetensors (the A and B matrices) and adapter.json (the base's spec and digest, the scheme
the base was held in while training, the LoRA settings, data hashes and the training recipe).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from ligero.errors import LigeroError
from ligero.models.lora import load_lora, merge_lora

ADAPTER_FILE, ADAPTER_META = "adapter.safetensors", "adapter.json"


def is_adapter_folder(path: Path) -> bool:
    return path.is_dir() and (path / ADAPTER_META).is_file()


def read_adapter(folder: str | Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """(adapter.json's content, the adapter tensors); one clear error for a missing or unreadable adapter."""
    folder = Path(folder)
    meta_path, weights = folder / ADAPTER_META, folder / ADAPTER_FILE
    if not meta_path.is_file() or not weights.is_file():
        raise LigeroError(f"{folder} holds no LoRA adapter ({ADAPTER_META} and {ADAPTER_FILE}); pass the folder "
                          "`ligero finetune --out` wrote")
    try:
        meta = json.loads(meta_path.read_text())
        state = load_file(str(weights))
        meta["base"]["sha256"], meta["lora"]["rank"]  # noqa: B018 - the fields every use needs
    except Exception as exc:  # JSON, UTF-8, safetensors' own errors, missing fields: all mean the same to a user
        raise LigeroError(f"the adapter in {folder} is unreadable ({type(exc).__name__}); train it again") from None
    return meta, state


def adapter_digest(folder: str | Path) -> str:
    """sha256 over the adapter's weights and settings: what identifies a fine-tuned model."""
    folder = Path(folder)
    h = hashlib.sha256()
    for name in (ADAPTER_FILE, ADAPTER_META):
        h.update(hashlib.sha256((folder / name).read_bytes()).digest())
    return h.hexdigest()


def check_base(meta: dict, folder: str | Path, given_label: str, given_sha256: str) -> None:
    base = meta["base"]
    if given_sha256 != base["sha256"]:
        raise LigeroError(f"the adapter in {folder} was trained on {base['label']} (sha256 {base['sha256'][:12]}…), "
                          f"not on {given_label} (sha256 {given_sha256[:12]}…); pass its base model")


def load_adapter_model(folder: Path, device: str, dtype: torch.dtype):
    """The adapter's base in full precision with the adapters merged into its weights (a LoadedModel)."""
    from ligero.io.checkpoint import load_model, model_digest, resolve_spec

    meta, state = read_adapter(folder)
    base_spec = meta["base"]["model"]
    try:
        base_path = resolve_spec(base_spec)
    except LigeroError:
        raise LigeroError(f"the base of the adapter in {folder} ({base_spec}) is not here; put the base model back "
                          "or train the adapter again on a model that is") from None
    check_base(meta, folder, meta["base"]["label"], model_digest(base_path))  # the same files, not the same name
    loaded = load_model(base_spec, device, dtype)
    lora = meta["lora"]
    load_lora(loaded.model, state, lora["rank"], lora["alpha"], tuple(lora["targets"]))
    merge_lora(loaded.model)
    loaded.model.requires_grad_(False)
    loaded.info["format"] = "adapter"
    loaded.info["source"] = {"path": str(folder), "format": "adapter", "base_source": loaded.info.get("source", {})}
    loaded.info["finetune"] = finetune_record(meta, folder)
    return loaded


def finetune_record(meta: dict, folder: str | Path) -> dict:
    """What a card and a results file say about a fine-tuned model: adapter, base, data, recipe, outcome."""
    base = meta["base"]
    return {"adapter": Path(folder).name, "adapter_sha256": adapter_digest(folder),
            "base": {"model": base["label"], "sha256": base["sha256"], "held_in": base["scheme"]},
            "lora": meta["lora"], "data": meta.get("data", {}), "train": meta.get("train", {}),
            "heldout_ppl_before": meta.get("heldout_ppl_before"), "heldout_ppl_after": meta.get("heldout_ppl_after"),
            "merged_into": "the base's full-precision weights"}
