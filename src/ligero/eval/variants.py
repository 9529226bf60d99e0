"""One way to build a variant: load a model, pick the recipe, calibrate when it needs to, quantize.

The CLI, the server, card profiling, the audit and the benchmarks all build their models here, so "fp32" (the
baseline), scheme names and calibration mean the same thing everywhere.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from ligero.errors import LigeroError
from ligero.eval.data import wikipedia_split
from ligero.eval.perplexity import make_windows, window_bos
from ligero.io.checkpoint import CHECKPOINT_FILE, LoadedModel, load_model
from ligero.quant.api import quantize
from ligero.quant.config import BASELINE, Recipe, recipe_for

__all__ = ["BASELINE", "CALIBRATION_SPLIT", "build_variant", "calibration_windows", "scheme_recipe"]

CALIBRATION_SPLIT = "calib"


def calibration_windows(tokenizer, n_windows: int, tokens_per_window: int = 256,
                        text: str | None = None) -> list[list[int]]:
    """Token windows from the calibration split (disjoint from evaluation) or from a user's text."""
    if n_windows < 1:
        raise LigeroError("calibration needs at least one window; raise --calib-windows")
    if tokenizer is None:
        raise LigeroError("calibration needs the model's tokenizer (tokenizer.json); add one to the model folder")
    ids = tokenizer.encode(text if text is not None else wikipedia_split(CALIBRATION_SPLIT).text, add_bos=False)
    # The same windows as evaluation uses (BOS first for BOS models), so calibration sees the inputs it serves.
    windows = make_windows(ids, tokens_per_window, bos=window_bos(tokenizer))[:n_windows]
    if len(ids) < tokens_per_window or not windows:
        raise LigeroError(f"the calibration text has fewer than {tokens_per_window} tokens; give more text")
    return windows


def scheme_recipe(scheme: str | None, group_size: int | None = None) -> Recipe | None:
    """The recipe of a scheme name; None for the baseline. Raises with the valid schemes for a bad name."""
    if scheme is None or scheme == BASELINE:
        if group_size is not None:
            raise LigeroError(f"--group-size needs a group-wise --scheme; the {BASELINE} baseline has no groups")
        return None
    return recipe_for(scheme, group_size)


def _saved_recipe(model_spec: str) -> dict | None:
    """The quantization recipe recorded in a saved Ligero folder, or None (not a folder, or not quantized)."""
    meta = Path(model_spec).expanduser() / CHECKPOINT_FILE
    if not meta.is_file():
        return None
    try:
        return json.loads(meta.read_text()).get("quantization")
    except (OSError, ValueError, AttributeError):
        return None  # unreadable: loading reports it properly


def build_variant(model_spec: str, scheme: str | None = None, *, group_size: int | None = None,
                  recipe: Recipe | None = None, calibration: list[list[int]] | None = None,
                  calib_windows: int = 8, calib_tokens_per_window: int = 256, calib_text: str | None = None,
                  device: str = "cpu") -> LoadedModel:
    """Load `model_spec` and quantize it with `recipe`, or with the recipe of `scheme` (None or BASELINE: the
    full-precision model); `recipe` wins over `scheme`. Calibration windows come from `calibration`, else
    `calib_text`, else the calibration split, and are only built when the recipe needs them. A saved quantized
    folder loads as it is (no scheme).

    The scheme is checked before the model loads. `info["quantize_seconds"]` holds the quantization time.
    """
    if recipe is None:
        recipe = scheme_recipe(scheme, group_size)
    if (recipe is not None or scheme is not None) and _saved_recipe(model_spec) is not None:
        raise LigeroError(f"{model_spec} is already quantized; drop --scheme to use it as saved, or pass the "
                          "full-precision model to quantize")
    loaded = load_model(model_spec, device)
    seconds = 0.0
    if recipe is not None:
        # With no windows asked for, quantize() names what is missing.
        if recipe.needs_calibration and calibration is None and calib_windows > 0:
            calibration = calibration_windows(loaded.tokenizer, calib_windows, calib_tokens_per_window, calib_text)
        t0 = time.perf_counter()
        quantize(loaded.model, recipe, calibration=calibration if recipe.needs_calibration else None)
        seconds = time.perf_counter() - t0
    loaded.info["quantize_seconds"] = round(seconds, 2)
    return loaded
