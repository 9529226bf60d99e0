"""The vision model's trained parts on disk: the projector and the LoRA adapters (bf16 safetensors, a few MB) with
a JSON record of how they were made (base model and its sha256, encoder, recipe, data digests).

Ligero ships one such adapter inside the package (vision/weights/), made by `ligero lab vision --ship`, so
`ligero generate --image` and `ligero serve` work on a fresh install without training first.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ligero.errors import LigeroError
from ligero.io.checkpoint import load_model
from ligero.models.lora import LoRALinear, load_lora, lora_state, merge_lora
from ligero.vision.model import ENCODER_NAME, VisionLanguageModel

WEIGHTS_DIR = Path(__file__).parent / "weights"
DEFAULT_ADAPTER = WEIGHTS_DIR / "smollm2-135m-vision"
FORMAT_VERSION = 2  # 2: the projector has a per-token grid embedding
TENSORS, META = "adapter.safetensors", "adapter.json"


def save_adapter(vlm: VisionLanguageModel, folder: str | Path, meta: dict) -> Path:
    """Write the projector and the language model's LoRA adapters (bf16) and `meta` (+ format, encoder, lora)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {f"projector.{k}": v.detach().to(torch.bfloat16).contiguous()
               for k, v in vlm.projector.state_dict().items()}
    tensors.update({f"lora.{k}": v.to(torch.bfloat16).contiguous() for k, v in lora_state(vlm.lm).items()})
    adapters = [m for m in vlm.lm.modules() if isinstance(m, LoRALinear)]
    lora = None
    if adapters:
        targets = sorted({name.rsplit(".", 1)[-1] for name, m in vlm.lm.named_modules() if isinstance(m, LoRALinear)})
        lora = {"rank": adapters[0].rank, "alpha": adapters[0].alpha, "targets": targets}
    record = {"format_version": FORMAT_VERSION, "encoder": ENCODER_NAME, "lora": lora,
              "grids": [list(g) for g in vlm.grids], "system_prompt": vlm.system_prompt, **meta}
    save_file(tensors, str(folder / TENSORS))
    (folder / META).write_text(json.dumps(record, indent=2) + "\n")
    return folder


def read_adapter(folder: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    folder = Path(folder)
    if not (folder / TENSORS).is_file() or not (folder / META).is_file():
        raise LigeroError(f"{folder} is not a vision adapter (it needs {TENSORS} and {META}); pass the folder "
                          "`ligero lab vision` wrote, or leave --adapter out for the shipped one")
    try:
        meta = json.loads((folder / META).read_text())
        tensors = load_file(str(folder / TENSORS))
    except (OSError, ValueError) as e:
        raise LigeroError(f"the vision adapter in {folder} is unreadable ({e}); retrain it with ligero lab vision") \
            from None
    if meta.get("format_version") != FORMAT_VERSION or meta.get("encoder") != ENCODER_NAME:
        raise LigeroError(f"{folder} holds a vision adapter of format {meta.get('format_version')} for encoder "
                          f"{meta.get('encoder')}; this Ligero reads format {FORMAT_VERSION} for {ENCODER_NAME}")
    return tensors, meta


def attach_adapter(vlm: VisionLanguageModel, tensors: dict[str, torch.Tensor], meta: dict, merge: bool = True) -> None:
    """Fill the projector and add (and by default merge) the LoRA adapters into the language model."""
    proj = {k.removeprefix("projector."): v.float() for k, v in tensors.items() if k.startswith("projector.")}
    try:
        vlm.projector.load_state_dict(proj)
    except RuntimeError as e:
        raise LigeroError(f"the adapter's projector does not fit this language model ({str(e).splitlines()[0]})") \
            from None
    lora = {k.removeprefix("lora."): v for k, v in tensors.items() if k.startswith("lora.")}
    if lora:
        spec = meta["lora"]
        load_lora(vlm.lm, lora, spec["rank"], spec["alpha"], tuple(spec["targets"]))
        if merge:
            merge_lora(vlm.lm)


def load_vision_model(adapter: str | Path | None = None, device: str = "cpu", merge: bool = True) \
        -> VisionLanguageModel:
    """The vision-language model: the adapter's base language model (full precision) with the adapter attached."""
    folder = Path(adapter) if adapter is not None else DEFAULT_ADAPTER
    if adapter is None and not (folder / TENSORS).is_file():
        raise LigeroError("this install has no trained vision adapter; train one with `ligero lab vision --ship`")
    tensors, meta = read_adapter(folder)
    base = meta.get("base_model", {})
    loaded = load_model(base.get("id", "smollm2-135m"), device=device)
    want = base.get("sha256")
    have = loaded.info.get("source_sha256") or loaded.info.get("source", {}).get("sha256")
    if want and have and want != have:
        raise LigeroError(f"the vision adapter was trained on {base.get('id')} with sha256 {want[:12]}..., but the "
                          f"installed file has {have[:12]}...; retrain it with ligero lab vision")
    grids = tuple(tuple(g) for g in meta.get("grids", [])) or None
    vlm = VisionLanguageModel(loaded.model, loaded.tokenizer, system_prompt=meta.get("system_prompt"),
                              **({"grids": grids} if grids else {}))
    attach_adapter(vlm, tensors, meta, merge)
    vlm.to(loaded.model.device)
    vlm.adapter_meta = meta
    return vlm
