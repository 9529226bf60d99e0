"""Transformers as the oracle for the real built-in models: its own GGUF loader, converted once per machine.

transformers reads a GGUF's metadata field by field in Python: Gemma 3's 262k-token vocabulary costs ~20 s a read,
and it reads the file once for the config, once for the weights and once more for the tokenizer. The result of that
conversion (the model in float32 and the tokenizer) is saved as a Hugging Face folder in Ligero's cache, keyed by the
file's sha256 and the transformers version, so later runs load it in seconds. The oracle stays transformers' own
reading of the same file; only its repetition is saved.
"""

from __future__ import annotations

import shutil
import tempfile
from functools import lru_cache
from pathlib import Path

import torch

from ligero.paths import cache_root


@lru_cache(maxsize=None)
def oracle_folder(model_id: str) -> Path:
    """A Hugging Face folder holding transformers' conversion of `model_id`'s GGUF file (made on first use)."""
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ligero.io.checkpoint import file_sha256, resolve_spec

    path = resolve_spec(model_id)
    folder = cache_root() / "hf-oracle" / f"{model_id}-{file_sha256(path)[:16]}-transformers-{transformers.__version__}"
    if (folder / "done").is_file():
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=folder.parent, prefix=".staging-"))
    try:
        model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
        # The weights are dequantized float32 by now; the GGUF marker only stops save_pretrained.
        model.hf_quantizer = None
        vars(model.config).pop("quantization_config", None)
        model.save_pretrained(staging)
        AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name).save_pretrained(staging)
        (staging / "done").write_text(f"{path.name}\n")
        shutil.rmtree(folder, ignore_errors=True)
        staging.rename(folder)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return folder


@lru_cache(maxsize=None)
def hf_model(model_id: str):
    """transformers' model of the built-in `model_id` (float32, eager attention), once per session."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(oracle_folder(model_id)), dtype=torch.float32,
                                                attn_implementation="eager").eval()


def hf_tokenizer(model_id: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(oracle_folder(model_id)))
